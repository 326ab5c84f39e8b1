"""Reference SGMV operators in plain torch: the truth in tests, and the CPU path.

Weight layout (the slot pool's stacked tensors, one pair per projection):
    a: [slots, layers, max_rank, in_features]   (A transposed: rank-major, rows contiguous)
    b: [slots, layers, max_rank, out_features]  (scaling already folded in)
    ranks: [slots] int, the real rank of each slot for this projection (0 = not targeted)
Segments: rows seg_indptr[i]:seg_indptr[i+1] use slot slot_ids[i]; slot -1 means no adapter.
Only the first `rank` rows of a slot are read, so a rank-4 adapter costs rank-4 bytes.
"""
from __future__ import annotations

import torch


def _as_list(t) -> list[int]:
    return t.tolist() if isinstance(t, torch.Tensor) else list(t)


def sgmv_shrink(v: torch.Tensor, x: torch.Tensor, a: torch.Tensor, seg_indptr, slot_ids,
                ranks, layer: int) -> torch.Tensor:
    """v[rows, :r] = x[rows] @ a[slot, layer, :r].T for every segment with slot >= 0.

    v: [n, >=max_rank] output; x: [n, in]. Columns past a segment's rank, and rows of
    no-adapter segments, are left as they were (sgmv_expand never reads them).
    """
    indptr, slots, rank_of = _as_list(seg_indptr), _as_list(slot_ids), _as_list(ranks)
    for i, slot in enumerate(slots):
        start, end = indptr[i], indptr[i + 1]
        if slot < 0 or end <= start or rank_of[slot] == 0:
            continue
        r = rank_of[slot]
        torch.matmul(x[start:end], a[slot, layer, :r].t(), out=v[start:end, :r])
    return v


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, seg_indptr, slot_ids,
                ranks, layer: int, col_offset: int = 0) -> torch.Tensor:
    """y[rows, col_offset:col_offset+out] += v[rows, :r] @ b[slot, layer, :r] per segment.

    y: [n, >= col_offset + out] (e.g. the fused qkv output); v: [n, >=max_rank].
    """
    indptr, slots, rank_of = _as_list(seg_indptr), _as_list(slot_ids), _as_list(ranks)
    out_features = b.shape[-1]
    for i, slot in enumerate(slots):
        start, end = indptr[i], indptr[i + 1]
        if slot < 0 or end <= start or rank_of[slot] == 0:
            continue
        r = rank_of[slot]
        y[start:end, col_offset:col_offset + out_features].addmm_(
            v[start:end, :r], b[slot, layer, :r])
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, projections, seg_indptr,
             slot_ids, layer: int, accumulate: bool = True) -> torch.Tensor:
    """For each (a, b, ranks, col_offset): shrink into v, then expand into y's window
    (zeroed first when not accumulating)."""
    for a, b, ranks, off in projections:
        if not accumulate:
            y[:, off:off + b.shape[-1]].zero_()
        sgmv_shrink(v, x, a, seg_indptr, slot_ids, ranks, layer)
        sgmv_expand(y, v, b, seg_indptr, slot_ids, ranks, layer, off)
    return y


def gather_bmm_shrink(x: torch.Tensor, a: torch.Tensor, row_slots: torch.Tensor,
                      layer: int) -> torch.Tensor:
    """The common no-kernel alternative, for benchmarks: gather each row's A, then bmm.

    row_slots: [n] slot per row (all >= 0). Returns [n, max_rank].
    """
    w = a[row_slots, layer]                        # [n, R, in]
    return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)


def gather_bmm_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, row_slots: torch.Tensor,
                      layer: int, col_offset: int = 0) -> torch.Tensor:
    w = b[row_slots, layer]                        # [n, R, out]
    out_features = b.shape[-1]
    y[:, col_offset:col_offset + out_features] += torch.bmm(v.unsqueeze(1), w).squeeze(1)
    return y
