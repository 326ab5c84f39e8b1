"""The model's view of LoRA in one step: the step's segments bound to the slot pool's weights."""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import ops
from ..engine.layout import LoraSegments
from ..ops.torch_small_batch import SmallBatchPlan, add_lora_small_batch
from .attention_triton import sm_count

# lora_overlap: the side launch should leave the base GEMM its SMs. cuBLAS's decode GEMMs hold
# a whole SM per CTA (384 threads x 168 registers) and launch 96-128 CTAs, so a LoRA CTA runs
# beside them only on an SM they leave free. Measured per site on an H200 (Llama-2-7B, 32 rows,
# benchmarks/diag/overlap_site.py): with at most ~64 CTAs for the launch (1-2 per item instead of
# 4-8) and, for o and down, cuBLASLt told to leave 32 SMs free (its default kernel there has 128
# CTAs; the 64-CTA one it then picks is as fast), the time the LoRA adds beside the GEMM fell from
# 31 to 16 us a layer with one adapter for all rows, and from 42 to 35 us with 32 adapters.
OVERLAP_LAUNCH_CTAS = 64
# The streamed kernel (csrc/lora_stream.cu: one CTA per SM walking its jobs through a ring of
# bulk-copied shared-memory stages) is slower than the fused one alone but adds less beside a
# GEMM (13B, 32 distinct adapters: LoRA added 1.38x vs 2.42x its bytes' read time). Its CTAs
# per site as a share of the GPU's SMs, measured on an H200 (132 SMs; Llama-2-7B and 13B,
# overlap_site.py --stream-ctas; results/diag/overlap_site_h200_*_streamed.json):
OVERLAP_KERNEL = "streamed"          # or "fused" (overlap_cluster's CTAs per item)
OVERLAP_STREAM_SMS = {"q_proj": 56 / 132, "o_proj": 32 / 132, "gate_proj": 64 / 132,
                      "down_proj": 48 / 132}
OVERLAP_FREE_SMS = 32
OVERLAP_FREE_SMS_SITES = (("o_proj",), ("down_proj",))   # q/k/v ignores it; gate/up got worse
OVERLAP_FREE_SMS_MAX_ROWS = 256     # memory-bound GEMMs only: prefill chunks keep every SM

# A step whose longest segment has more rows than this (a prefill chunk beside decode rows, as
# in continuous batching) runs the tensor-core pair (path 2), without the side-stream overlap:
# the decode kernels (fused and streamed) walk a segment's rows a few at a time on one cluster
# or CTA: a 7B step with one 128-row chunk beside 31 decode rows took ~250 ms, now ~55 ms, most
# of it host time (benchmarks/diag/mixed_steps.py). The op's own test (rows <= 8 x segments)
# only sees the average.
LONG_SEGMENT_ROWS = 8
PAIR_PATH = 2

# Without the CUDA kernels (CPU, or a GPU without the extension): with at least this many
# adapter segments and at most this many rows, one batched matmul over all slots beats a pair
# of matmuls per segment (see ops/torch_small_batch.py).
SMALL_BATCH_MIN_SEGMENTS = 3
SMALL_BATCH_MAX_ROWS = 64


def uses_lora_kernels(device, dtype) -> bool:
    """Whether LoraContext runs the CUDA kernels for this device and dtype (else the torch
    reference)."""
    return torch.device(device).type == "cuda" and dtype in ops.KERNEL_DTYPES \
        and ops.cuda_ops() is not None


class LoraContext:
    """Adds every row's adapter delta to a projection site's output: with the CUDA kernels one
    op per site (q/k/v, o, gate/up, down), fused into a single launch for decode batches.

    Built once per step; `apply` is called per layer and does no Python work per adapter beyond
    the op calls (the CPU reference loops over segments inside the op).
    """

    def __init__(self, pool, segments: LoraSegments, num_rows: int, dtype, device,
                 overlap: bool = False):
        self.pool = pool
        ind = segments.indptr
        longest = max((ind[i + 1] - ind[i] for i in range(len(ind) - 1)), default=0)
        self.path = PAIR_PATH if longest > LONG_SEGMENT_ROWS else 0
        self._overlap(overlap and self.path == 0, device)
        self.seg = segments
        # v: [T, max_rank] shrink output, shared by all projections (each reads its own :rank)
        self.v = torch.empty(num_rows, pool.max_rank, dtype=dtype, device=device)
        kernels = uses_lora_kernels(device, dtype)
        # The CUDA kernels want device tensors; the torch reference wants Python ints (no
        # host sync per call).
        self._indptr = segments.indptr_t if kernels else segments.indptr
        self._slots = segments.slot_ids_t if kernels else segments.slot_ids
        self._lists = not kernels
        used = [s for s in segments.slot_ids if s >= 0]
        # largest rank in use per projection; 0 means no row's adapter targets it
        self.rank = {p: max((pool.rank_of(p, s) for s in used), default=0)
                     for p in pool.projections}
        self.active = {p: r > 0 for p, r in self.rank.items()}
        self.small = None
        if not kernels and len(used) >= SMALL_BATCH_MIN_SEGMENTS \
                and num_rows <= SMALL_BATCH_MAX_ROWS:
            row_slots = [s for i, s in enumerate(segments.slot_ids)
                         for _ in range(segments.indptr[i + 1] - segments.indptr[i])]
            self.small = SmallBatchPlan(row_slots, device)

    @classmethod
    def for_graph(cls, pool, indptr_t: torch.Tensor, slot_ids_t: torch.Tensor,
                  v: torch.Tensor, overlap: bool = False, path: int = 0) -> "LoraContext":
        """Every projection active and all segment metadata on the device, so that nothing is
        read on the host and the step can be captured in a CUDA graph (CUDA kernels only;
        a slot's rank 0 makes its projection a no-op inside the kernel). path: the kernels'
        choice, 0 for decode steps' 1-row segments, PAIR_PATH where segments can be long."""
        ctx = cls.__new__(cls)
        ctx.pool, ctx.v, ctx.small, ctx.path = pool, v, None, path
        ctx._overlap(overlap, v.device)
        ctx._indptr, ctx._slots, ctx._lists = indptr_t, slot_ids_t, False
        ctx.rank = {p: pool.max_rank for p in pool.projections}
        ctx.active = {p: True for p in pool.projections}
        return ctx

    # -- overlap: the site's LoRA beside its base projection --------------------------------
    def _overlap(self, overlap: bool, device) -> None:
        self.overlap = overlap
        self.side = _side_stream(torch.device(device)) \
            if overlap and torch.device(device).type == "cuda" else None
        self._deltas: dict[tuple[str, ...], torch.Tensor] = {}

    def start(self, x: torch.Tensor, layer: int, projs: tuple[str, ...], out_features: int):
        """With overlap: the site's delta (x's rows x out_features), computed on the side
        stream into its own buffer while the caller runs the base projection; else None."""
        if not self.overlap or not any(self.active.get(p) for p in projs):
            return None
        d = self._deltas.get(projs)
        if d is None or d.shape != (x.shape[0], out_features):
            d = self._deltas[projs] = torch.empty(x.shape[0], out_features, dtype=x.dtype,
                                                  device=x.device)
        if self.side is not None:
            self.side.wait_stream(torch.cuda.current_stream(x.device))   # x is ready
        with torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext():
            self.apply(d, x, layer, projs, accumulate=False,     # d = delta: no zeroing
                       cluster=overlap_cluster(len(self._slots) * len(projs)),
                       ctas=overlap_stream_ctas(projs, x.device),
                       x_ready=self.side is not None)   # the side stream waited for x
        return d

    def base_projection(self, site: tuple[str, ...], delta: torch.Tensor | None):
        """Context for the base GEMM of a site whose delta (start's result) runs beside it: for
        o and down, cuBLASLt leaves OVERLAP_FREE_SMS SMs to the LoRA launch."""
        if delta is None or self.side is None or site not in OVERLAP_FREE_SMS_SITES \
                or delta.shape[0] > OVERLAP_FREE_SMS_MAX_ROWS:
            return contextlib.nullcontext()
        return leave_sms_free(OVERLAP_FREE_SMS)

    def finish(self, out: torch.Tensor, x: torch.Tensor, layer: int, projs: tuple[str, ...],
               delta: torch.Tensor | None) -> torch.Tensor | None:
        """After the base projection: None once the site's delta is added into out (no
        overlap), else the delta start made, ready on the current stream, for the consumer
        of out to add (the fused elementwise ops take it as lora_delta)."""
        if delta is None:
            self.apply(out, x, layer, projs)
            return None
        if self.side is not None:
            torch.cuda.current_stream(out.device).wait_stream(self.side)
        return delta

    def apply(self, out: torch.Tensor, x: torch.Tensor, layer: int, projs: tuple[str, ...],
              accumulate: bool = True, cluster: int = 0, ctas: int = 0, x_ready: bool = False):
        """out: [T, site_out] fused projection output; x: [T, in] its input. accumulate=False:
        out = the site's delta (every column of the site is written). cluster: the fused
        kernel's CTAs per (segment, projection), 0 = its own choice; ctas > 0: the streamed
        kernel on that many CTAs instead (decode batches, sm_90). x_ready: x was final before
        the launch (ops.add_lora)."""
        active = [p for p in projs if self.active.get(p)]
        if not accumulate and (self.small is not None or len(active) < len(projs)):
            out.zero_()     # these paths write only the active projections' windows
            accumulate = True
        if not active:
            return
        if self.small is not None:
            for p in active:
                w = self.pool.weights[p]
                add_lora_small_batch(out, x, w.a, w.b, self.small, layer, self.rank[p],
                                     self.pool.col_offsets[p])
            return
        # one op call per site: with the CUDA kernels a single fused launch for q/k/v or
        # gate/up; the torch reference (host rank lists: no host sync per call) loops inside
        weights = self.pool.weights
        projections = [(weights[p].a, weights[p].b,
                        weights[p].ranks_list if self._lists else weights[p].ranks,
                        self.pool.col_offsets[p]) for p in active]
        # the largest rank in use (an eager step's adapters; the pool's max rank in a graph)
        # shapes the fused kernel's launch
        ops.add_lora(out, x, self.v, projections, self._indptr, self._slots, layer, accumulate,
                     cluster, ctas, self.path, x_ready, max(self.rank[p] for p in active))


def overlap_cluster(items: int) -> int:
    """CTAs per (segment, projection) for a LoRA launch beside its base GEMM: the largest
    power of two up to 8 that keeps the launch within OVERLAP_LAUNCH_CTAS (at least 1)."""
    c = 8
    while c > 1 and items * c > OVERLAP_LAUNCH_CTAS:
        c //= 2
    return c


def overlap_stream_ctas(site: tuple[str, ...], device) -> int:
    """CTAs of the streamed kernel for a site's LoRA beside its GEMM (OVERLAP_STREAM_SMS of the
    device's SMs); 0 (the fused kernel) off CUDA, for unknown sites or with OVERLAP_KERNEL
    "fused"."""
    share = OVERLAP_STREAM_SMS.get(site[0])
    if OVERLAP_KERNEL != "streamed" or share is None or torch.device(device).type != "cuda":
        return 0
    return max(1, round(share * sm_count(torch.device(device).index or 0)))


@contextlib.contextmanager
def leave_sms_free(sms: int):
    """cuBLASLt picks its GEMM kernels for (SMs - sms) SMs inside this block (torch's private
    SM carve-out, which only the cuBLASLt backend honours); a no-op where torch lacks either."""
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    getter = getattr(torch._C, "_get_sm_carveout_experimental", None)
    backend = torch.backends.cuda.preferred_blas_library()
    try:
        if setter is None or getter is None:
            raise RuntimeError("no SM carve-out in this torch")
        torch.backends.cuda.preferred_blas_library("cublaslt")
    except RuntimeError:        # a build without cuBLASLt (CPU), or an older / newer torch
        yield
        return
    before = getter()
    setter(sms)
    try:
        yield
    finally:
        setter(before)
        torch.backends.cuda.preferred_blas_library(backend)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device):
    """One side stream per device for the LoRA work (kept: graphs captured on it replay).
    High priority: its small launches take SMs ahead of the base projection's tiles."""
    return torch.cuda.Stream(device, priority=-1)
