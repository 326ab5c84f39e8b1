"""DecodeGraphs: decode steps on CUDA replayed from captured graphs.

A decode step of a 7B model launches well over a thousand kernels; launched one by one from
Python they take far longer than the work they do (benchmarks/results/decode_graphs_h200.json:
a step with 32 distinct adapters took 24 ms eagerly, 8.1 ms replayed). Here each batch-size
bucket has one graph of the whole forward (two: with and without LoRA), captured on first use
over static buffers. A step writes its inputs into two pinned host buffers, copies them to the device, and
replays the graph; every row is its own LoRA segment; padding rows attend to nothing, write
their K/V into the KV cache's scratch block and use no adapter. Nothing in a replayed step
reads device memory on the host: the sampled tokens are the step's one synchronisation.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .. import ops
from ..adapters.slots import SlotPool
from ..model.kv_cache import KVCache
from ..model.llama import LlamaModel
from ..model.lora import LoraContext
from .layout import BatchLayout, ScheduledChunk

log = logging.getLogger("punica")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def capture_graph(fn, pool=None, warmup: int = 1):
    """torch's capture recipe: fn runs `warmup` times on a side stream (allocations, cuBLAS
    workspaces and Triton compiles happen outside the capture), then once inside it. Returns
    (graph, what the captured call returned: its outputs live in the graph's memory)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads go on meanwhile (the adapter loaders pin host memory, a user
    # registers an adapter while the loop captures at start); under torch's default "global"
    # a CUDA call of theirs during the capture may be refused and break it. Only the engine's
    # thread launches work on the device, so nothing of theirs can join the capture.
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def capture_missing(keys, captured: dict, write_padding, capture) -> int:
    """Captures each of keys not in captured yet (capture(*key)), over padding inputs that
    write_padding() puts in the buffers once first; returns how many. Both graph classes'
    capture_all."""
    keys = [k for k in keys if k not in captured]
    if keys:
        log.info("capturing %d CUDA graphs (requests wait until it is done)", len(keys))
        write_padding()
    for key in keys:
        capture(*key)
    return len(keys)


def graphs_supported(model: LlamaModel) -> bool:
    """CUDA, and the Triton paged decode attention (the reference gathers data-dependent
    shapes and cannot be captured)."""
    if model.device.type != "cuda":
        return False
    from ..model.attention_triton import triton_available
    return triton_available()


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: KVCache, pool: SlotPool, max_batch: int,
                 max_model_len: int, lora_overlap: bool = False):
        self.model, self.kv, self.pool = model, kv, pool
        self.lora_overlap = lora_overlap
        self.max_rows = n = max_batch
        self.buckets = [b for b in BUCKETS if b < n] + [n]
        # LoRA inside a graph needs the CUDA SGMV kernels (the reference loops on the host)
        self.lora_ok = pool.num_slots > 0 and ops.cuda_ops() is not None \
            and model.dtype in ops.KERNEL_DTYPES
        self.width = -(-max_model_len // kv.block_size)             # block-table columns
        dev = model.device
        # int64 rows: token ids, positions, KV slot of each row's new key
        self._long_host = torch.zeros(3, n, dtype=torch.long, pin_memory=True)
        self._long = torch.zeros(3, n, dtype=torch.long, device=dev)
        # int32: context lens [n] | seg indptr [n + 1] | seg slot ids [n] | block tables [n, w]
        size = 3 * n + 1 + n * self.width
        self._int_host = torch.zeros(size, dtype=torch.int32, pin_memory=True)
        self._int = torch.zeros(size, dtype=torch.int32, device=dev)
        self._long_np, self._int_np = self._long_host.numpy(), self._int_host.numpy()
        # one LoRA segment per row, for good: the decode kernels spread their work over
        # segments, so one long segment (an adapter for the whole batch) would run on a few
        # CTAs; as 1-row segments its weights come from L2 after the first row
        self._int_np[n:2 * n + 1] = np.arange(n + 1)
        self._copied = torch.cuda.Event()
        self._rows = torch.arange(n, device=dev)
        self._v = torch.empty(n, max(pool.max_rank, 1), dtype=model.dtype, device=dev)
        self._mempool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._contexts: dict[tuple[int, bool], LoraContext | None] = {}

    # -- views of the device buffers ---------------------------------------------------------
    def _ctx(self, b):
        return self._int[:b]

    def _indptr(self, b):
        return self._int[self.max_rows:self.max_rows + b + 1]

    def _slots(self, b):
        return self._int[2 * self.max_rows + 1:2 * self.max_rows + 1 + b]

    def _tables(self, b):
        start = 3 * self.max_rows + 1
        return self._int[start:].view(self.max_rows, self.width)[:b]

    # -- one step ----------------------------------------------------------------------------
    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        """A step of decode rows only (one token each, all sampling), small enough, and with
        LoRA only where the kernels can be captured."""
        if not chunks or len(chunks) > self.max_rows:
            return False
        if not all(len(c.token_ids) == 1 and c.sample for c in chunks):
            return False
        return self.lora_ok or all(c.slot < 0 for c in chunks)

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [len(chunks), V] (a view of the graph's output, valid until the next step)."""
        n = len(chunks)
        bucket = next(b for b in self.buckets if b >= n)
        with_lora = any(c.slot >= 0 for c in chunks)
        self._write_inputs(chunks)
        graph, logits = self._graphs.get((bucket, with_lora)) or self._capture(bucket,
                                                                              with_lora)
        graph.replay()
        return logits[:n]

    def _write_inputs(self, chunks: list[ScheduledChunk]) -> None:
        self._copied.synchronize()      # the last step's copy has left the pinned buffer
        bs, rows = self.kv.block_size, self.max_rows
        ids, pos, slot_map, ctx = self._long_np[0], self._long_np[1], self._long_np[2], \
            self._int_np[:rows]
        seg_slots = self._int_np[2 * rows + 1:3 * rows + 1]
        tables = self._int_np[3 * rows + 1:].reshape(rows, self.width)
        ids[:] = 0
        pos[:] = 0
        slot_map[:] = self.kv.scratch_slot
        ctx[:] = 0
        seg_slots[:] = -1
        for i, c in enumerate(chunks):
            p = c.first_pos
            ids[i], pos[i], ctx[i], seg_slots[i] = c.token_ids[0], p, p + 1, c.slot
            slot_map[i] = c.block_table[p // bs] * bs + p % bs
            tables[i, :len(c.block_table)] = c.block_table
        self._long.copy_(self._long_host, non_blocking=True)
        self._int.copy_(self._int_host, non_blocking=True)
        self._copied.record()

    # -- capture -----------------------------------------------------------------------------
    def _layout(self, b: int) -> BatchLayout:
        return BatchLayout(
            input_ids=self._long[0, :b], positions=self._long[1, :b],
            slot_mapping=self._long[2, :b], decode_rows=self._rows[:b],
            decode_kv_index=None, decode_kv_mask=None, prefills=[],
            logit_rows=self._rows[:b], block_tables=self._tables(b),
            context_lens=self._ctx(b))

    def _capture(self, b: int, with_lora: bool):
        layout = self._layout(b)
        lora = LoraContext.for_graph(self.pool, self._indptr(b), self._slots(b),
                                     self._v[:b], overlap=self.lora_overlap) \
            if with_lora else None
        # the inputs of this step are already in the buffers: a valid batch to warm up on
        graph, logits = capture_graph(lambda: self.model.forward(layout, self.kv, lora),
                                      pool=self._mempool)
        self._graphs[(b, with_lora)] = (graph, logits)
        # the graph reads and writes the context's buffers (lora_overlap's deltas, made in the
        # warm-up): they must live as long as the graph
        self._contexts[(b, with_lora)] = lora
        return graph, logits

    def capture_all(self) -> int:
        """Captures every bucket not captured yet (with and without LoRA where it can run),
        over padding inputs; returns how many. For a server's start: a bucket's first use
        otherwise pays its capture inside a step."""
        keys = [(b, lora) for b in self.buckets for lora in (False, True)
                if self.lora_ok or not lora]
        return capture_missing(keys, self._graphs, lambda: self._write_inputs([]),
                               self._capture)

    @property
    def captured(self) -> list[tuple[int, bool]]:
        return sorted(self._graphs)
