"""MixedGraphs: steps that prefill (continuous batching) on CUDA, replayed from captured graphs.

A step that prefills a new request beside running ones runs eagerly and host-bound: on 7B
~55 ms, mostly Python launching ~190 Triton kernels and the LoRA ops
(benchmarks/results/diag/mixed_steps_h200_7b_after.json), against a 7 ms decode step. Here such
a step is laid out in fixed shapes and replayed: its rows padded to a row bucket, its chunks
(a decode row is a chunk of one row) to a chunk bucket, each chunk its own LoRA segment (the
tensor-core pair, as eager steps with long segments use), attention from the paged Triton
kernels reading device metadata. Padding rows write their K/V into the KV cache's scratch slot,
belong to no chunk and no segment, and are never sampled; padding chunks have no rows.

On the H200 a 7B step that prefills 128 rows beside 31 decode rows went from 52-78 ms to 20-21
ms (median, two passes) and continuous batching from 1505-1818 to 2655-2856 tokens/s
(benchmarks/results/diag/mixed_steps_h200_7b_graphs_{off,on}.json). A bucket's graph is
captured on its first use, or with all the others by capture_all (Engine.capture_graphs: the
serving loops call it at start). EngineConfig.cuda_graphs=False (--enforce-eager) runs every
step eagerly; tests switch MIXED_GRAPHS off for the reference.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from ..adapters.slots import SlotPool
from ..model.kv_cache import KVCache
from ..model.llama import LlamaModel
from ..model.lora import PAIR_PATH, LoraContext
from .cuda_graphs import capture_graph, capture_missing
from .layout import BatchLayout, PrefillTables, ScheduledChunk

MIXED_GRAPHS = True
ROW_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
CHUNK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _bucket(n: int, buckets) -> int:
    return next(b for b in buckets if b >= n)


class MixedGraphs:
    def __init__(self, model: LlamaModel, kv: KVCache, pool: SlotPool, max_batch: int,
                 max_tokens_per_step: int, max_model_len: int):
        self.model, self.kv, self.pool = model, kv, pool
        self.max_rows = _bucket(min(max_tokens_per_step, ROW_BUCKETS[-1]), ROW_BUCKETS)
        self.max_chunks = _bucket(min(max_batch, CHUNK_BUCKETS[-1]), CHUNK_BUCKETS)
        self.row_buckets = [b for b in ROW_BUCKETS if b <= self.max_rows]
        self.chunk_buckets = [b for b in CHUNK_BUCKETS if b <= self.max_chunks]
        self.lora_ok = pool.num_slots > 0 and ops.cuda_ops() is not None \
            and model.dtype in ops.KERNEL_DTYPES
        self.width = -(-max_model_len // kv.block_size)
        T, C, dev = self.max_rows, self.max_chunks, model.device
        cuda = dev.type == "cuda"       # the layout also builds on the CPU (tests)
        # int64: token ids, positions, KV slot of each row | the logit row of each chunk
        self._long_host = torch.zeros(3 * T + C, dtype=torch.long, pin_memory=cuda)
        self._long = torch.zeros(3 * T + C, dtype=torch.long, device=dev)
        # int32: chunk starts | lens | first positions | seg indptr [C + 1] | seg slots |
        # block tables [C, width]
        self._int_host = torch.zeros(5 * C + 1 + C * self.width, dtype=torch.int32,
                                     pin_memory=cuda)
        self._int = torch.zeros(self._int_host.shape, dtype=torch.int32, device=dev)
        self._long_np, self._int_np = self._long_host.numpy(), self._int_host.numpy()
        self._copied = torch.cuda.Event() if cuda else None
        self._v = torch.empty(T, max(pool.max_rank, 1), dtype=model.dtype, device=dev)
        self._mempool = torch.cuda.graph_pool_handle() if cuda else None
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._contexts: dict[tuple[int, int, bool], LoraContext | None] = {}

    # -- views of the device buffers ---------------------------------------------------------
    def _longs(self, i: int, n: int) -> torch.Tensor:
        return self._long[i * self.max_rows:i * self.max_rows + n]

    def _ints(self, i: int, n: int) -> torch.Tensor:
        return self._int[i * self.max_chunks:i * self.max_chunks + n]

    def _segment_indptr(self, c: int) -> torch.Tensor:
        start = 3 * self.max_chunks
        return self._int[start:start + c + 1]

    def _segment_slots(self, c: int) -> torch.Tensor:
        start = 4 * self.max_chunks + 1
        return self._int[start:start + c]

    def _tables(self, c: int) -> torch.Tensor:
        start = 5 * self.max_chunks + 1
        return self._int[start:].view(self.max_chunks, self.width)[:c]

    # -- one step ----------------------------------------------------------------------------
    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        """A step with at least one chunk of several rows (decode-only steps are
        DecodeGraphs'), within the largest buckets, LoRA only where the kernels capture."""
        if not MIXED_GRAPHS or not chunks or len(chunks) > self.max_chunks:
            return False
        rows = sum(len(c.token_ids) for c in chunks)
        if rows > self.max_rows or all(len(c.token_ids) == 1 for c in chunks):
            return False
        return self.lora_ok or all(c.slot < 0 for c in chunks)

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [chunks that sample, V] (a view of the graph's output, valid until the next
        step), in the chunks' order."""
        rows = sum(len(c.token_ids) for c in chunks)
        key = (_bucket(rows, self.row_buckets), _bucket(len(chunks), self.chunk_buckets),
               any(c.slot >= 0 for c in chunks))
        sampled = self.write_inputs(chunks)
        graph, logits = self._graphs.get(key) or self._capture(*key)
        graph.replay()
        if sampled == list(range(len(sampled))):
            return logits[:len(sampled)]
        return logits[torch.tensor(sampled, device=logits.device)]

    def write_inputs(self, chunks: list[ScheduledChunk]) -> list[int]:
        """Fills the pinned buffers for chunks and copies them to the device; returns the
        indices (into the chunk bucket's logits) of the chunks that sample."""
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the pinned buffer
        T, C, bs = self.max_rows, self.max_chunks, self.kv.block_size
        lng, it = self._long_np, self._int_np
        ids, pos, slot_map, logit_rows = lng[:T], lng[T:2 * T], lng[2 * T:3 * T], lng[3 * T:]
        starts, lens, first = it[:C], it[C:2 * C], it[2 * C:3 * C]
        indptr, seg_slots = it[3 * C:4 * C + 1], it[4 * C + 1:5 * C + 1]
        tables = it[5 * C + 1:].reshape(C, self.width)
        ids[:] = 0
        pos[:] = 0
        slot_map[:] = self.kv.scratch_slot
        logit_rows[:] = 0
        lens[:] = 0
        first[:] = 0
        seg_slots[:] = -1
        row = 0
        sampled = []
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            p = np.arange(c.first_pos, c.first_pos + n)
            table = np.asarray(c.block_table, dtype=np.int64)
            ids[row:row + n] = c.token_ids
            pos[row:row + n] = p
            slot_map[row:row + n] = table[p // bs] * bs + p % bs
            starts[i], lens[i], first[i], seg_slots[i] = row, n, c.first_pos, c.slot
            tables[i, :len(c.block_table)] = c.block_table
            indptr[i] = row
            row += n
            logit_rows[i] = row - 1
            if c.sample:
                sampled.append(i)
        starts[len(chunks):] = row          # padding chunks: no rows, empty segments
        indptr[len(chunks):] = row
        self._long.copy_(self._long_host, non_blocking=True)
        self._int.copy_(self._int_host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return sampled

    # -- capture -----------------------------------------------------------------------------
    def layout(self, rows: int, chunks: int) -> BatchLayout:
        """The bucket's layout over the device buffers (what the captured forward reads)."""
        dev = self.model.device
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return BatchLayout(
            input_ids=self._longs(0, rows), positions=self._longs(1, rows),
            slot_mapping=self._longs(2, rows), decode_rows=empty, decode_kv_index=None,
            decode_kv_mask=None, prefills=[],
            logit_rows=self._long[3 * self.max_rows:3 * self.max_rows + chunks],
            prefill_tables=PrefillTables(self._ints(0, chunks), self._ints(1, chunks),
                                         self._ints(2, chunks), self._tables(chunks), rows))

    def lora(self, rows: int, chunks: int) -> LoraContext:
        return LoraContext.for_graph(self.pool, self._segment_indptr(chunks),
                                     self._segment_slots(chunks), self._v[:rows],
                                     path=PAIR_PATH)

    def _capture(self, rows: int, chunks: int, with_lora: bool):
        layout = self.layout(rows, chunks)
        lora = self.lora(rows, chunks) if with_lora else None
        graph, logits = capture_graph(lambda: self.model.forward(layout, self.kv, lora),
                                      pool=self._mempool)
        self._graphs[(rows, chunks, with_lora)] = (graph, logits)
        self._contexts[(rows, chunks, with_lora)] = lora
        return graph, logits

    def capture_all(self) -> int:
        """Captures every (row bucket, chunk bucket, LoRA) not captured yet over padding
        inputs (rows that write the scratch slot, chunks without rows); returns how many
        (none while MIXED_GRAPHS is off: no step would replay them)."""
        if not MIXED_GRAPHS:
            return 0
        keys = [(r, c, lora) for r in self.row_buckets for c in self.chunk_buckets
                for lora in (False, True) if c <= r and (self.lora_ok or not lora)]
        return capture_missing(keys, self._graphs, lambda: self.write_inputs([]),
                               self._capture)

    @property
    def captured(self) -> list[tuple[int, int, bool]]:
        return sorted(self._graphs)
