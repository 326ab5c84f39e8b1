"""LoRA operators with backend dispatch.

`sgmv_shrink` / `sgmv_expand` pick the CUDA extension (built from csrc/) for CUDA tensors when
it is available, and the torch reference otherwise. See torch_ref.py for the layouts.
"""
from __future__ import annotations


import torch

from . import torch_ref
from .backend import cuda_ops

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def kernels_for(t) -> object | None:
    """The CUDA backend when it serves this tensor (CUDA, fp16/bf16), else None."""
    return cuda_ops() if t.is_cuda and t.dtype in KERNEL_DTYPES else None


def sgmv_shrink(v, x, a, seg_indptr, slot_ids, ranks, layer: int):
    """v[rows, :r] = x[rows] @ a[slot, layer, :r].T per segment (see torch_ref)."""
    ops = kernels_for(x)
    if ops is not None:
        return ops.sgmv_shrink(v, x, a, seg_indptr, slot_ids, ranks, layer)
    return torch_ref.sgmv_shrink(v, x, a, seg_indptr, slot_ids, ranks, layer)


def sgmv_expand(y, v, b, seg_indptr, slot_ids, ranks, layer: int, col_offset: int = 0):
    """y[rows, off:off+out] += v[rows, :r] @ b[slot, layer, :r] per segment (see torch_ref)."""
    ops = kernels_for(y)
    if ops is not None:
        return ops.sgmv_expand(y, v, b, seg_indptr, slot_ids, ranks, layer, col_offset)
    return torch_ref.sgmv_expand(y, v, b, seg_indptr, slot_ids, ranks, layer, col_offset)


def add_lora(y, x, v, projections, seg_indptr, slot_ids, layer: int, accumulate: bool = True,
             cluster: int = 0, ctas: int = 0, path: int = 0, x_ready: bool = False,
             rank_bound: int = 0):
    """y[rows, off:off+out] += (x @ a[slot, layer, :r].T) @ b[slot, layer, :r] for each
    (a, b, ranks, col_offset) in `projections`, all reading x; v is the shrink's workspace
    ([n, >= max_rank]; the fused CUDA kernel does not touch it). accumulate=False: the
    windows are overwritten (=, rows without an adapter get 0); segments cover every row.
    cluster: the fused CUDA kernel's CTAs per (segment, projection), 0 = its own choice.
    ctas > 0: the streamed CUDA kernel on that many CTAs (beside a GEMM), for decode batches.
    path: the CUDA kernels' choice (0 auto, 2 the tensor-core pair: see cuda_backend.add_lora);
    x_ready: x was final before the op's launch, rank_bound: no segment's rank exceeds it
    (both: see cuda_backend.add_lora); the reference ignores path, x_ready and rank_bound."""
    ops = kernels_for(x)
    if ops is not None:
        return ops.add_lora(y, x, v, projections, seg_indptr, slot_ids, layer, accumulate,
                            cluster, ctas, path, x_ready, rank_bound)
    return torch_ref.add_lora(y, x, v, projections, seg_indptr, slot_ids, layer, accumulate)


__all__ = ["sgmv_shrink", "sgmv_expand", "add_lora", "torch_ref", "cuda_ops", "kernels_for"]
