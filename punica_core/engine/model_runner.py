"""ModelRunner: turns a scheduled batch into one forward pass and sampled tokens."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapters.slots import SlotPool
from ..model.kv_cache import KVCache
from ..model.llama import LlamaModel
from ..model.lora import LoraContext, uses_lora_kernels
from .cuda_graphs import DecodeGraphs
from .layout import BatchLayout, build_layout
from .mixed_graphs import MixedGraphs
from .sampling import sample
from .scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, pool: SlotPool,
                 graphs: DecodeGraphs | None = None, lora_overlap: bool = False,
                 mixed_graphs: MixedGraphs | None = None):
        self.model, self.kv, self.pool = model, kv, pool
        self.lora_overlap = lora_overlap
        self.graphs = graphs    # decode steps replay CUDA graphs when they fit
        self.mixed_graphs = mixed_graphs    # and steps that prefill
        self.capture = None     # tests set a list here to receive (request ids, logits) per step
        self._step_event = None     # a step's done probe (CUDA), recorded at its first ask

    def _step_done_probe(self) -> Callable[[], bool] | None:
        """After a step's launch: a callable, True once the GPU has finished the step (one
        reused event, recorded at the first call: until the tokens are read, the compute
        stream gets only what the shadow's loads put there, a few tiny kernels such as an
        evicted slot's rank reset, so a step that never asks pays no CUDA call); None off
        CUDA."""
        if self.model.device.type != "cuda":
            return None
        if self._step_event is None:
            self._step_event = torch.cuda.Event()
        event, recorded = self._step_event, []

        def done() -> bool:
            if not recorded:
                event.record()
                recorded.append(True)
            return event.query()
        return done

    def capture_graphs(self) -> int:
        """Captures every CUDA graph bucket now (see Engine.capture_graphs); how many."""
        n = self.graphs.capture_all() if self.graphs is not None else 0
        if self.mixed_graphs is not None:
            n += self.mixed_graphs.capture_all()
        return n

    def prepare(self, batch: ScheduledBatch) -> BatchLayout:
        return build_layout(batch.chunks, self.kv.block_size, self.model.device,
                            paged_prefill=self.model.uses_paged_prefill(),
                            one_row_decode_segments=uses_lora_kernels(self.model.device,
                                                                      self.model.dtype))

    def forward(self, layout: BatchLayout) -> torch.Tensor:
        """Logits [B, V] of the rows that sample."""
        lora = None
        if layout.lora is not None and layout.lora.any_adapter:
            lora = LoraContext(self.pool, layout.lora, layout.num_rows, self.model.dtype,
                               self.model.device, overlap=self.lora_overlap)
        return self.model.forward(layout, self.kv, lora)

    def run(self, batch: ScheduledBatch,
            while_computing: Callable[[Callable[[], bool] | None], object] | None = None
            ) -> list[int | None]:
        """One token per scheduled request (None for chunks that do not sample yet).
        while_computing runs once the step is launched, before its tokens are read: on a GPU
        it overlaps the step's compute. It gets a callable that says whether the step has
        finished on the GPU (None on a CPU, where it has)."""
        if self.graphs is not None and self.graphs.fits(batch.chunks):
            logits = self.graphs.run(batch.chunks)
        elif self.mixed_graphs is not None and self.mixed_graphs.fits(batch.chunks):
            logits = self.mixed_graphs.run(batch.chunks)
        else:
            logits = self.forward(self.prepare(batch))
        sampling = [(r, c) for r, c in zip(batch.requests, batch.chunks) if c.sample]
        if self.capture is not None:
            self.capture.append(([r.id for r, _ in sampling], logits.detach().cpu()))
        tokens = sample(logits, [r.params for r, _ in sampling],
                        [r.generator for r, _ in sampling]) if sampling else None
        if while_computing is not None:
            while_computing(self._step_done_probe())
        it = iter(tokens.tolist() if tokens is not None else [])
        return [next(it) if c.sample else None for c in batch.chunks]
