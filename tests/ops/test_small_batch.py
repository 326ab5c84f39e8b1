"""The CPU small-batch LoRA path against the segment-wise reference."""
import pytest
import torch

from punica_core.ops import torch_ref
from punica_core.ops.torch_small_batch import SmallBatchPlan, add_lora_small_batch


@pytest.mark.parametrize("seed", range(4))
def test_small_batch_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    S, L, R, fin, fout, layer = 6, 3, 16, 40, 24, 1
    ranks = torch.randint(0, R + 1, (S,), generator=g).tolist()
    a = torch.zeros(S, L, R, fin, dtype=torch.float64)
    b = torch.zeros(S, L, R, fout, dtype=torch.float64)
    for s, r in enumerate(ranks):      # the pool keeps rows past a slot's rank at zero
        a[s, :, :r] = torch.randn(L, r, fin, generator=g, dtype=torch.float64)
        b[s, :, :r] = torch.randn(L, r, fout, generator=g, dtype=torch.float64)
    # rows sorted by slot, one-row and multi-row segments, some rows without an adapter
    seg_slots = [-1, 0, 2, 3, -1, 5]
    lengths = torch.randint(1, 4, (len(seg_slots),), generator=g).tolist()
    indptr = [0]
    for n in lengths:
        indptr.append(indptr[-1] + n)
    n = indptr[-1]
    x = torch.randn(n, fin, generator=g, dtype=torch.float64)
    y0 = torch.randn(n, fout + 8, generator=g, dtype=torch.float64)
    ref = y0.clone()
    v = torch.zeros(n, R, dtype=torch.float64)
    torch_ref.sgmv_shrink(v, x, a, indptr, seg_slots, ranks, layer)
    torch_ref.sgmv_expand(ref, v, b, indptr, seg_slots, ranks, layer, col_offset=8)
    row_slots = [s for i, s in enumerate(seg_slots) for _ in range(lengths[i])]
    ours = add_lora_small_batch(y0.clone(), x, a, b, SmallBatchPlan(row_slots, "cpu"), layer,
                                max(ranks), col_offset=8)
    assert torch.allclose(ours, ref, atol=1e-10)
    assert not torch.equal(ref, y0) or max(ranks) == 0


@pytest.mark.parametrize("row_slots", [
    [0, 1, 2, 3, 4, 5],             # one row per slot, consecutive: per-row weight views
    [2, 3, 4],                      # consecutive from a later slot
    [0, 2, 3, 5],                   # one row per slot with gaps: gathered weights
    [-1, 1, 2, -1, 4],              # rows without an adapter in between
    [0, 0, 1, 3, 3, 3],             # several rows per slot: the all-slots product
])
def test_small_batch_paths_equal_reference(row_slots):
    g = torch.Generator().manual_seed(len(row_slots))
    S, L, R, fin, fout, layer = 6, 2, 8, 48, 20, 1
    ranks = [8, 4, 0, 8, 2, 6]
    a = torch.zeros(S, L, R, fin, dtype=torch.float64)
    b = torch.zeros(S, L, R, fout, dtype=torch.float64)
    for s, r in enumerate(ranks):
        a[s, :, :r] = torch.randn(L, r, fin, generator=g, dtype=torch.float64)
        b[s, :, :r] = torch.randn(L, r, fout, generator=g, dtype=torch.float64)
    indptr, seg_slots = [0], []
    for i, s in enumerate(row_slots):
        if seg_slots and seg_slots[-1] == s:
            indptr[-1] = i + 1
        else:
            seg_slots.append(s)
            indptr.append(i + 1)
    n = len(row_slots)
    x = torch.randn(n, fin, generator=g, dtype=torch.float64)
    y0 = torch.randn(n, fout + 4, generator=g, dtype=torch.float64)
    ref = y0.clone()
    v = torch.zeros(n, R, dtype=torch.float64)
    torch_ref.sgmv_shrink(v, x, a, indptr, seg_slots, ranks, layer)
    torch_ref.sgmv_expand(ref, v, b, indptr, seg_slots, ranks, layer, col_offset=4)
    plan = SmallBatchPlan(row_slots, "cpu")
    used = [s for s in row_slots if s >= 0]
    assert plan.one_per_slot == (len(set(used)) == len(used))
    assert plan.consecutive == (row_slots in ([0, 1, 2, 3, 4, 5], [2, 3, 4]))
    rank = max(ranks[s] for s in used)
    ours = add_lora_small_batch(y0.clone(), x, a, b, plan, layer, rank, col_offset=4)
    assert torch.allclose(ours, ref, atol=1e-10)
