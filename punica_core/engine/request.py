"""Request: one generation, from the queue to its last token; RequestOutput: what streams get."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    request_id: str
    adapter: str | None
    text: str                       # all text so far
    token_ids: list[int]            # all generated tokens so far
    delta: str = ""                 # text new since the last output
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None    # "stop", "length", "abort", "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    time_to_first_token: float | None = None


class Request:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                 tokenizer, eos_ids: tuple[int, ...], request_id: str | None = None,
                 stream=None, device="cpu", default_generator=None,
                 resume_output_ids: list[int] | None = None):
        self.id = request_id or f"req-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.adapter = adapter
        self.eos_ids = () if params.ignore_eos else eos_ids
        self.stream = stream
        self.status = Status.WAITING
        self.seq = next(_ids)               # arrival order; preempted requests keep theirs
        self.num_computed = 0               # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.slot = -1                      # adapter slot while running
        self.detok = IncrementalDetokenizer(tokenizer, params.stop)
        self.generator = default_generator
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        for t in resume_output_ids or []:   # a migrated request continues where it was
            self.output_ids.append(t)
            self.detok.add(t)
        self.detok.emitted = len(self.detok.text)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, stop: int) -> list[int]:
        """all_ids[start:stop] without building all_ids (the scheduler asks every step for a
        decode row's last token: a concatenation per request per step grows with context)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:stop - p]
        if stop <= p:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[:stop - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache (1 while decoding)."""
        return self.num_tokens - self.num_computed

    def append(self, token: int, max_model_len: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.output_ids.append(token)
        hit_stop = self.detok.add(token)
        if token in self.eos_ids or token in self.params.stop_token_ids or hit_stop:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"

    def emit(self, new_ids: list[int]) -> RequestOutput:
        """Builds the output for this step and pushes it to the stream, if any."""
        final = self.finish_reason is not None
        delta = self.detok.delta(final)     # when final, everything counts as emitted
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        out = RequestOutput(self.id, self.adapter, self.detok.text[:self.detok.emitted],
                            list(self.output_ids), delta, new_ids, final, self.finish_reason,
                            self.error, len(self.prompt_ids), ttft)
        if self.stream is not None:
            self.stream.put(out)
        return out
