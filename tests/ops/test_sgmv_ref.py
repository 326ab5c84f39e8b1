"""The torch reference SGMV ops (the truth for the CUDA kernels) against a dense per-row loop.

CPU only; runs in CI.
"""
import pytest
import torch

from punica_core.ops import torch_ref

POISON = 12345.0


def make_problem(seed, dtype, *, slots=5, layers=3, max_rank=16, fin=40, fout=24,
                 seg_slots=(-1, 3, 0, 3, 4, -1, 1), seg_lens=(2, 1, 0, 3, 4, 1, 2),
                 ranks=(4, 16, 0, 7, 1)):
    """Random weights, unsorted slot ids, empty segments, slot -1 and a slot of rank 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(slots, layers, max_rank, fin, generator=g, dtype=dtype)
    b = torch.randn(slots, layers, max_rank, fout, generator=g, dtype=dtype)
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)
    x = torch.randn(indptr[-1], fin, generator=g, dtype=dtype)
    return a, b, x, indptr, list(seg_slots), list(ranks)


def dense_rows(indptr, seg_slots):
    """(row, slot) for every row, in row order."""
    return [(row, s) for i, s in enumerate(seg_slots) for row in range(indptr[i], indptr[i + 1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", [0, 2])
def test_shrink_matches_per_row_dot_products(dtype, layer):
    a, _, x, indptr, seg_slots, ranks = make_problem(layer, dtype)
    v = torch.full((x.shape[0], a.shape[2] + 3), POISON, dtype=dtype)
    torch_ref.sgmv_shrink(v, x, a, indptr, seg_slots, ranks, layer)

    expect = torch.full_like(v, POISON)
    for row, s in dense_rows(indptr, seg_slots):
        if s < 0:
            continue
        for j in range(ranks[s]):
            expect[row, j] = (x[row].double() * a[s, layer, j].double()).sum().to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(v, expect, rtol=tol, atol=tol)
    # columns past a segment's rank and rows without an adapter were left alone
    assert (v[:, 16:] == POISON).all()
    assert (v[0:2] == POISON).all()                      # slot -1 segment
    assert (v[indptr[6]:indptr[7], :16] != POISON).all()  # slot 1 (rank 16) wrote all 16
    assert (v[indptr[1]:indptr[2], 7:] == POISON).all()   # slot 3 (rank 7) wrote 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("col_offset", [0, 5])
def test_expand_matches_per_row_accumulation(dtype, col_offset):
    a, b, x, indptr, seg_slots, ranks = make_problem(7 + col_offset, dtype)
    layer, fout = 1, b.shape[-1]
    g = torch.Generator().manual_seed(99)
    v = torch.randn(x.shape[0], a.shape[2], generator=g, dtype=dtype)
    y0 = torch.randn(x.shape[0], fout + col_offset + 4, generator=g, dtype=dtype)
    y = torch_ref.sgmv_expand(y0.clone(), v, b, indptr, seg_slots, ranks, layer, col_offset)

    expect = y0.clone()
    for row, s in dense_rows(indptr, seg_slots):
        if s < 0:
            continue
        r = ranks[s]
        delta = (v[row, :r].double()[:, None] * b[s, layer, :r].double()).sum(0)
        expect[row, col_offset:col_offset + fout] += delta.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, expect, rtol=tol, atol=tol)
    # columns outside [col_offset, col_offset + out) and rows without an adapter are unchanged
    assert torch.equal(y[:, :col_offset], y0[:, :col_offset])
    assert torch.equal(y[:, col_offset + fout:], y0[:, col_offset + fout:])
    assert torch.equal(y[0:2], y0[0:2])
    assert not torch.equal(y[2:], y0[2:])


def test_rank_rows_past_the_slot_rank_are_never_read():
    """Garbage (NaN) in the stored rows past a slot's rank must not reach the output."""
    a, b, x, indptr, seg_slots, ranks = make_problem(3, torch.float64)
    for s, r in enumerate(ranks):
        a[s, :, r:] = float("nan")
        b[s, :, r:] = float("nan")
    v = torch.zeros(x.shape[0], a.shape[2], dtype=torch.float64)
    torch_ref.sgmv_shrink(v, x, a, indptr, seg_slots, ranks, 0)
    y = torch_ref.sgmv_expand(torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float64), v, b,
                              indptr, seg_slots, ranks, 0)
    assert torch.isfinite(y).all()
    assert torch.isfinite(v).all()


def test_tensor_metadata_equals_list_metadata():
    a, b, x, indptr, seg_slots, ranks = make_problem(5, torch.float64)
    v1 = torch.zeros(x.shape[0], a.shape[2], dtype=torch.float64)
    v2 = v1.clone()
    torch_ref.sgmv_shrink(v1, x, a, indptr, seg_slots, ranks, 1)
    torch_ref.sgmv_shrink(v2, x, a, torch.tensor(indptr, dtype=torch.int32),
                          torch.tensor(seg_slots, dtype=torch.int32),
                          torch.tensor(ranks, dtype=torch.int32), 1)
    assert torch.equal(v1, v2)


def test_gather_bmm_baselines_match_the_reference():
    """The benchmark's gather + bmm baseline computes the same delta (all ranks equal)."""
    g = torch.Generator().manual_seed(11)
    S, L, R, fin, fout = 4, 2, 8, 32, 48
    a = torch.randn(S, L, R, fin, generator=g, dtype=torch.float64)
    b = torch.randn(S, L, R, fout, generator=g, dtype=torch.float64)
    row_slots = torch.tensor([2, 0, 3, 3, 1, 0])
    x = torch.randn(len(row_slots), fin, generator=g, dtype=torch.float64)
    v = torch_ref.gather_bmm_shrink(x, a, row_slots, 1)
    y = torch_ref.gather_bmm_expand(torch.zeros(len(row_slots), fout + 8, dtype=torch.float64), v,
                                    b, row_slots, 1, col_offset=8)
    for row, s in enumerate(row_slots.tolist()):
        torch.testing.assert_close(v[row], a[s, 1] @ x[row])
        torch.testing.assert_close(y[row, 8:], v[row] @ b[s, 1])
    assert (y[:, :8] == 0).all()


def test_cuda_backend_is_inert_without_a_gpu(monkeypatch):
    """Importing punica_core never compiles; without CUDA the backend reports unavailable."""
    import torch.utils.cpp_extension as cpp_ext

    import punica_core.ops as ops
    from punica_core.ops import backend, cuda_backend

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")

    def refuse(*args, **kwargs):
        raise AssertionError("tried to compile on a machine without CUDA")

    monkeypatch.setattr(cpp_ext, "load", refuse)
    cuda_backend.available.cache_clear()
    backend.cuda_ops.cache_clear()
    assert cuda_backend.available() is False
    assert ops.cuda_ops() is None
    # and the public ops fall back to the reference on CPU tensors
    a, b, x, indptr, seg_slots, ranks = make_problem(2, torch.float32)
    v = torch.zeros(x.shape[0], a.shape[2])
    ops.sgmv_shrink(v, x, a, indptr, seg_slots, ranks, 0)
    ref = torch_ref.sgmv_shrink(torch.zeros_like(v), x, a, indptr, seg_slots, ranks, 0)
    assert torch.equal(v, ref)
