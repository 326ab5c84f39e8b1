"""SamplingParams and the per-step sampler."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidRequestError


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k <= 0 and top_p 1 switch them off."""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
             f"temperature must be in [0, 100], got {self.temperature!r}"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1], got {self.top_p!r}"),
            (isinstance(self.top_k, int), f"top_k must be an integer, got {self.top_k!r}"),
            (self.seed is None or isinstance(self.seed, int),
             f"seed must be an integer, got {self.seed!r}"),
            (len(self.stop) <= 16 and all(isinstance(s, str) and len(s) <= 256
                                          for s in self.stop),
             "stop must be at most 16 strings of at most 256 characters"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] float32. Greedy rows take the argmax; others temperature / top-k / top-p.
    The token ids [B] stay on the logits' device (the caller reads them once)."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop tokens once the mass before them already reaches top_p (keeps at least one)
            drop = probs.cumsum(-1) - probs >= p.top_p
            row = row.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = row.softmax(-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out
