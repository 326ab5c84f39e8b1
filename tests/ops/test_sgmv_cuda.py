"""The CUDA SGMV kernels against the torch reference (fp32 on upcast inputs).

Needs a GPU (run on the device machine); skipped elsewhere. Every check poisons what the kernel
must not touch (NaN in the weights' rows past a slot's rank, NaN in v's columns past the rank,
NaN in the shrink output) and draws fresh random inputs.

`python tests/ops/test_sgmv_cuda.py` runs a few small cases of every path without pytest, for
`compute-sanitizer --tool memcheck`.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from punica_core.ops import torch_ref  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = [torch.float16, torch.bfloat16]
# ||out - ref|| / ||ref|| against fp32 math on the same (rounded) inputs.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
AUTO, SIMT, MMA = 0, 1, 2
NAN = float("nan")


@pytest.fixture(scope="module")
def kernels():
    from punica_core.ops import cuda_backend
    assert cuda_backend.available(), "the CUDA extension did not build or load"
    return cuda_backend


def make_problem(dtype, fin, fout, ranks, seg_slots, seg_lens, *, layers=2, max_rank=None,
                 seed=0):
    """Weights with NaN in every stored row past a slot's rank (they must never be read)."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    slots, R = len(ranks), max_rank or max(1, max(ranks))
    a = torch.randn(slots, layers, R, fin, generator=g, device=dev) / math.sqrt(fin)
    b = torch.randn(slots, layers, R, fout, generator=g, device=dev) / math.sqrt(max(ranks + [1]))
    for s, r in enumerate(ranks):
        a[s, :, r:] = NAN
        b[s, :, r:] = NAN
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)
    x = torch.randn(indptr[-1], fin, generator=g, device=dev)
    as_i32 = lambda t: torch.tensor(t, dtype=torch.int32, device=dev)  # noqa: E731
    return dict(a=a.to(dtype), b=b.to(dtype), x=x.to(dtype), indptr=indptr, slots=list(seg_slots),
                ranks=list(ranks), indptr_t=as_i32(indptr), slots_t=as_i32(seg_slots),
                ranks_t=as_i32(ranks))


def written_mask(p, n, width, col_offset=0, out=None):
    """Which elements of v (or of y's column window) a segment writes."""
    mask = torch.zeros(n, width, dtype=torch.bool, device="cuda")
    for i, s in enumerate(p["slots"]):
        if 0 <= s < len(p["ranks"]) and p["ranks"][s] > 0:
            lo, hi = p["indptr"][i], p["indptr"][i + 1]
            if out is None:
                mask[lo:hi, :p["ranks"][s]] = True
            else:
                mask[lo:hi, col_offset:col_offset + out] = True
    return mask


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_shrink(p, layer, path, extra_cols=3):
    x, a = p["x"], p["a"]
    n, R = x.shape[0], a.shape[2]
    v = torch.full((n, R + extra_cols), NAN, dtype=x.dtype, device="cuda")
    torch.ops.punica.sgmv_shrink(v, x, a, p["indptr_t"], p["slots_t"], p["ranks_t"], layer, path)
    ref = torch.full((n, R + extra_cols), NAN, device="cuda")
    torch_ref.sgmv_shrink(ref, x.float(), a[:, layer:layer + 1].float(), p["indptr"], p["slots"],
                          p["ranks"], 0)
    return v, ref


def check_shrink(p, layer, path):
    v, ref = run_shrink(p, layer, path)
    mask = written_mask(p, v.shape[0], v.shape[1])
    assert torch.isnan(v[~mask]).all(), "shrink wrote outside its segments' ranks"
    assert torch.isfinite(v[mask]).all(), "shrink left part of its output unwritten (or NaN)"
    if mask.any():
        err = rel_err(v[mask], ref[mask])
        assert err < TOL[v.dtype], f"shrink relative error {err:.2e}"
    return v


def check_expand(p, layer, path, col_offset=0, extra_cols=0):
    x, b = p["x"], p["b"]
    n, R, fout = x.shape[0], b.shape[2], b.shape[3]
    g = torch.Generator(device="cuda").manual_seed(layer + 17)
    v = torch.randn(n, R, generator=g, device="cuda").to(x.dtype)
    for i, s in enumerate(p["slots"]):          # columns past the rank are unspecified: NaN
        if 0 <= s < len(p["ranks"]):
            v[p["indptr"][i]:p["indptr"][i + 1], p["ranks"][s]:] = NAN
    y0 = torch.randn(n, col_offset + fout + extra_cols, generator=g, device="cuda").to(x.dtype)
    y = y0.clone()
    torch.ops.punica.sgmv_expand(y, v, b, p["indptr_t"], p["slots_t"], p["ranks_t"], layer,
                                 col_offset, path)
    ref = y0.float()
    torch_ref.sgmv_expand(ref, v.float(), b[:, layer:layer + 1].float(), p["indptr"], p["slots"],
                          p["ranks"], 0, col_offset)
    mask = written_mask(p, n, y.shape[1], col_offset, fout)
    assert torch.equal(y[~mask], y0[~mask]), "expand changed elements outside its window"
    if mask.any():
        assert torch.isfinite(y[mask]).all()
        delta_ref = ref[mask] - y0[mask].float()
        err = ((y[mask].float() - ref[mask]).norm() / delta_ref.norm().clamp_min(1e-30)).item()
        assert err < 2 * TOL[y.dtype], f"expand relative error {err:.2e}"
    return y


# 1-row, empty, long, slot -1 and unsorted slots in one batch
SEG_SLOTS = [2, -1, 0, 3, 1, 0, -1, 2, 3]
SEG_LENS = [1, 3, 0, 37, 1, 130, 0, 5, 1]


# (rank, pool's max rank): pools below 128 change the slot strides and the workspace widths
RANK_POOL = [(r, 128) for r in (1, 2, 3, 4, 8, 15, 16, 32, 64, 100, 128)] + \
            [(r, pool) for r, pool in ((1, 8), (3, 16), (16, 16), (20, 32), (17, 48), (33, 64),
                                       (64, 64))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank,pool", RANK_POOL)
@pytest.mark.parametrize("path", [SIMT, MMA])
def test_every_rank(kernels, dtype, rank, pool, path):
    # sizes that are multiples of 8 but not of any tile (64, 128, 1024)
    p = make_problem(dtype, 1032, 1000, [rank, rank, 0, rank], SEG_SLOTS, SEG_LENS,
                     max_rank=pool, seed=rank)
    check_shrink(p, 1, path)
    check_expand(p, 1, path, col_offset=8, extra_cols=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", [AUTO, SIMT, MMA])
@pytest.mark.parametrize("fin,fout", [(576, 576), (4096, 4096), (4096, 11008), (5120, 13824),
                                      (28672, 8192), (8192, 28672)])
@pytest.mark.parametrize("pool", [128, 64])
def test_mixed_ranks_one_launch(kernels, dtype, path, fin, fout, pool):
    g = torch.Generator().manual_seed(fin + fout)
    ranks = [4, 8, 16, 64, 128, 0, 1, 37] if pool == 128 else [4, 8, 16, 64, 48, 0, 1, 37]
    n_seg = 24
    seg_slots = torch.randint(-1, len(ranks), (n_seg,), generator=g).tolist()
    seg_lens = torch.randint(0, 4, (n_seg,), generator=g).tolist()
    seg_lens[5] = 300   # one long segment among decode rows
    p = make_problem(dtype, fin, fout, ranks, seg_slots, seg_lens, max_rank=pool, seed=fin)
    check_shrink(p, 0, path)
    check_expand(p, 1, path, col_offset=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_distinct_adapters(kernels, dtype):
    """64 one-row segments, all different adapters (the auto path picks the decode kernels)."""
    ranks = [16] * 64
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist()
    p = make_problem(dtype, 4096, 11008, ranks, slots, [1] * 64, max_rank=64)
    check_shrink(p, 1, AUTO)
    check_expand(p, 1, AUTO, col_offset=4096, extra_cols=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fin,lens", [(4096, [2048, 700, 1]),      # split-K over the input dim
                                      (128, [1500, 2000, 900])])   # one K-slice: direct write
@pytest.mark.parametrize("ranks", [[64, 16, 128], [64, 16, 40]])     # pools of 128 and 64
def test_long_segments(kernels, dtype, fin, lens, ranks):
    p = make_problem(dtype, fin, 4096, ranks, [1, 0, 2], lens, max_rank=max(ranks), seed=fin)
    check_shrink(p, 0, AUTO)
    check_expand(p, 0, AUTO)


def test_split_k_shrink_gives_the_same_bits_every_run(kernels):
    """Split over the input dimension (4096 rows in 2 segments: 8 K-slices), each slice's
    partial sums in its own workspace plane, summed in slice order: two runs agree bit for bit
    (fp32 atomics into one plane would land in any order). A pool of rank 32: sm_90's bulk
    shrink, which has no K split, takes pools of 64 and 128 at this size."""
    p = make_problem(torch.bfloat16, 4096, 256, [32, 16], [0, 1], [2048, 2048], seed=3)
    first = check_shrink(p, 1, MMA)
    for _ in range(3):
        again, _ = run_shrink(p, 1, MMA)
        assert torch.equal(torch.nan_to_num(again, 7.0), torch.nan_to_num(first, 7.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", [AUTO, MMA])
def test_sizes_without_16_byte_rows(kernels, dtype, path):
    """Odd sizes and offsets fall back to element loads (MMA requests too), still correct."""
    p = make_problem(dtype, 577, 1001, [5, 16, 128], [2, -1, 0, 1], [3, 1, 200, 1], max_rank=128)
    check_shrink(p, 1, path)
    check_expand(p, 0, path, col_offset=3, extra_cols=5)
    # x viewed at an odd element offset: not 16-byte aligned
    p = make_problem(dtype, 1024, 512, [16, 8], [1, 0], [40, 2], max_rank=16)
    big = torch.randn(p["x"].shape[0], 1025, device="cuda").to(dtype)
    big[:, 1:] = p["x"]
    p["x"] = big[:, 1:]
    check_shrink(p, 0, path)


@pytest.mark.parametrize("path", [AUTO, SIMT, MMA])
def test_nothing_to_do(kernels, path):
    p = make_problem(torch.bfloat16, 1024, 1024, [0, 16], [-1, 0, -1, 1], [3, 2, 0, 0],
                     max_rank=16)
    check_shrink(p, 0, path)   # rank 0, slot -1 and empty segments: v stays all NaN
    check_expand(p, 0, path)
    v = torch.zeros(0, 16, dtype=torch.bfloat16, device="cuda")
    empty = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.ops.punica.sgmv_shrink(v, p["x"][:0], p["a"], empty, empty[:0], p["ranks_t"], 0, path)


def test_invalid_slot_ids_touch_nothing(kernels):
    """Device metadata cannot be checked without a sync: bad values must at least be harmless."""
    p = make_problem(torch.float16, 1024, 1024, [16, 16], [0, 1], [2, 2], max_rank=16)
    p["slots_t"] = torch.tensor([7, -5], dtype=torch.int32, device="cuda")
    v = torch.full((4, 16), NAN, dtype=torch.float16, device="cuda")
    torch.ops.punica.sgmv_shrink(v, p["x"], p["a"], p["indptr_t"], p["slots_t"], p["ranks_t"], 0)
    torch.cuda.synchronize()
    assert torch.isnan(v).all()


def test_public_ops_dispatch_to_cuda(kernels):
    import punica_core.ops as ops
    from punica_core.ops.backend import cuda_ops
    cuda_ops.cache_clear()
    assert ops.cuda_ops() is kernels
    p = make_problem(torch.bfloat16, 2048, 1024, [8, 16, 4], [2, 0, -1, 1], [1, 1, 1, 1],
                     max_rank=16)
    v = torch.zeros(4, 16, dtype=torch.bfloat16, device="cuda")
    ops.sgmv_shrink(v, p["x"], p["a"], p["indptr"], p["slots"], p["ranks"], 1)  # python lists
    ref = torch.zeros(4, 16, device="cuda")
    torch_ref.sgmv_shrink(ref, p["x"].float(), p["a"].float(), p["indptr"], p["slots"],
                          p["ranks"], 1)
    assert rel_err(v, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("lens", [[1] * 32, [600, 1, 900]])
def test_cuda_graph_replay_with_new_inputs(kernels, lens):
    """Captured once, replayed with new activations and a new slot order (PDL / split-K)."""
    dtype = torch.bfloat16
    ranks = [16, 64, 8, 128] * 8
    slots = list(range(len(lens)))
    p = make_problem(dtype, 4096, 4096, ranks, slots, lens, max_rank=128)
    n = p["x"].shape[0]
    x, a, b = p["x"].clone(), p["a"], p["b"]
    v = torch.zeros(n, 128, dtype=dtype, device="cuda")
    y = torch.zeros(n, 4096, dtype=dtype, device="cuda")
    indptr, slot_t, rank_t = p["indptr_t"], p["slots_t"].clone(), p["ranks_t"]

    def step():
        torch.ops.punica.sgmv_shrink(v, x, a, indptr, slot_t, rank_t, 1)
        torch.ops.punica.sgmv_expand(y, v, b, indptr, slot_t, rank_t, 1, 0)

    from helpers import capture_cuda_graph
    graph = capture_cuda_graph(step)

    new_slots = list(reversed(slots)) if len(slots) > 1 else slots
    new_slots[0] = -1
    x.copy_(torch.randn_like(x, dtype=torch.float32).to(dtype))
    slot_t.copy_(torch.tensor(new_slots, dtype=torch.int32))
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref_v = torch.zeros(n, 128, device="cuda")
    torch_ref.sgmv_shrink(ref_v, x.float(), a.float(), p["indptr"], new_slots, ranks, 1)
    ref = torch.zeros(n, 4096, device="cuda")
    torch_ref.sgmv_expand(ref, ref_v, b.float(), p["indptr"], new_slots, ranks, 1)
    assert rel_err(y, ref) < 2 * TOL[dtype]
    assert (y[:lens[0]] == 0).all()   # the first segment now has no adapter


def test_torch_compile_fullgraph(kernels):
    p = make_problem(torch.float16, 1024, 2048, [16, 32], [1, 0], [3, 2], max_rank=32)

    @torch.compile(fullgraph=True)
    def lora(y, x, v, a, b, indptr, slots, ranks):
        torch.ops.punica.sgmv_shrink(v, x, a, indptr, slots, ranks, 0)
        torch.ops.punica.sgmv_expand(y, v, b, indptr, slots, ranks, 0, 0)
        return y

    y = torch.zeros(5, 2048, dtype=torch.float16, device="cuda")
    v = torch.zeros(5, 32, dtype=torch.float16, device="cuda")
    out = lora(y, p["x"], v, p["a"], p["b"], p["indptr_t"], p["slots_t"], p["ranks_t"])
    ref_v = torch.zeros(5, 32, device="cuda")
    torch_ref.sgmv_shrink(ref_v, p["x"].float(), p["a"].float(), p["indptr"], p["slots"],
                          p["ranks"], 0)
    ref = torch.zeros(5, 2048, device="cuda")
    torch_ref.sgmv_expand(ref, ref_v, p["b"].float(), p["indptr"], p["slots"], p["ranks"], 0)
    assert rel_err(out, ref) < 2 * TOL[torch.float16]


# --------------------------------------------------------------------------------------------
# Bad arguments: a clear error from the C++ boundary, never a launch.
def _args():
    p = make_problem(torch.bfloat16, 256, 512, [8, 16], [1, 0], [2, 3], max_rank=16)
    v = torch.zeros(5, 16, dtype=torch.bfloat16, device="cuda")
    return p, v


def _shrink(v, x, a, indptr, slots, ranks, layer=0, path=0):
    torch.ops.punica.sgmv_shrink(v, x, a, indptr, slots, ranks, layer, path)


@pytest.mark.parametrize("case,match", [
    ("x_fp32", "only float16 and bfloat16"),
    ("a_dtype", "a is"),
    ("v_dtype", "v is"),
    ("a_noncontig", "a must be contiguous"),
    ("x_noncontig", "contiguous in its last dimension"),
    ("v_cpu", "v must be a CUDA tensor"),
    ("all_cpu", "x must be a CUDA tensor"),
    ("indptr_cpu", "seg_indptr must be a CUDA tensor"),
    ("in_features", "in_features"),
    ("rows", "rows"),
    ("v_narrow", "fewer than the max rank"),
    ("indptr_len", "one more entry"),
    ("indptr_int64", "must be int32"),
    ("ranks_len", "slots"),
    ("layer", "layer 2 out of range"),
    ("path", "path must be"),
    ("a_3d", r"must be \[slots, layers, max_rank, features\]"),
])
def test_shrink_rejects_bad_arguments(kernels, case, match):
    p, v = _args()
    x, a, ip, sl, rk = p["x"], p["a"], p["indptr_t"], p["slots_t"], p["ranks_t"]
    layer, path = 0, 0
    if case == "x_fp32":
        x = x.float()
    elif case == "a_dtype":
        a = a.half()
    elif case == "v_dtype":
        v = v.half()
    elif case == "a_noncontig":
        a = torch.zeros(*a.shape[:3], 512, dtype=a.dtype, device="cuda")[..., :256]
    elif case == "x_noncontig":
        x = torch.zeros(256, 5, dtype=x.dtype, device="cuda").t()
    elif case == "v_cpu":
        v = v.cpu()
    elif case == "all_cpu":
        v, x, a, ip, sl, rk = (t.cpu() for t in (v, x, a, ip, sl, rk))
    elif case == "indptr_cpu":
        ip = ip.cpu()
    elif case == "in_features":
        x = torch.zeros(5, 128, dtype=x.dtype, device="cuda")
    elif case == "rows":
        v = torch.zeros(4, 16, dtype=v.dtype, device="cuda")
    elif case == "v_narrow":
        v = torch.zeros(5, 8, dtype=v.dtype, device="cuda")
    elif case == "indptr_len":
        ip = ip[:-1]
    elif case == "indptr_int64":
        ip = ip.long()
    elif case == "ranks_len":
        rk = torch.tensor([8, 16, 4], dtype=torch.int32, device="cuda")
    elif case == "layer":
        layer = 2
    elif case == "path":
        path = 7
    elif case == "a_3d":
        a = a[:, 0]
    with pytest.raises(RuntimeError, match=match):
        _shrink(v, x, a, ip, sl, rk, layer, path)
    torch.cuda.synchronize()   # the context is still healthy


@pytest.mark.parametrize("case,match", [
    ("col_offset", "do not fit in y"),
    ("neg_offset", "do not fit in y"),
    ("b_dtype", "b is"),
    ("y_cpu", "y must be a CUDA tensor"),
    ("y_rows", "rows"),
    ("b_noncontig", "b must be contiguous"),
])
def test_expand_rejects_bad_arguments(kernels, case, match):
    p, v = _args()
    y = torch.zeros(5, 512, dtype=torch.bfloat16, device="cuda")
    b, off = p["b"], 0
    if case == "col_offset":
        off = 8
    elif case == "neg_offset":
        off = -8
    elif case == "b_dtype":
        b = b.half()
    elif case == "y_cpu":
        y = y.cpu()
    elif case == "y_rows":
        y = torch.zeros(6, 512, dtype=torch.bfloat16, device="cuda")
    elif case == "b_noncontig":
        b = torch.zeros(*b.shape[:3], 1024, dtype=b.dtype, device="cuda")[..., ::2]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.punica.sgmv_expand(y, v, b, p["indptr_t"], p["slots_t"], p["ranks_t"], 0, off)
    torch.cuda.synchronize()


@pytest.mark.parametrize("rows", [512, 1000, 2048])
def test_split_k_shrink_every_slice_count(kernels, rows):
    """Row counts that give different K-splits, with a long and two shorter segments."""
    p = make_problem(torch.bfloat16, 4096, 512, [64, 16, 128], [1, 0, 2],
                     [rows - 200, 150, 50], max_rank=128, seed=rows)
    check_shrink(p, 0, MMA)
    check_expand(p, 1, MMA)


def rows_for_bulk_shrink():
    """Rows that the auto dispatch gives sm_90's bulk shrink: one wave of 32-row items."""
    return 32 * torch.cuda.get_device_properties(0).multi_processor_count - 40


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fin", [576, 4104])   # 4104: a last stage of 8 of its 64 columns
@pytest.mark.parametrize("pool,ranks", [(16, [16, 5, 9, 1]), (64, [64, 40, 1, 16]),
                                        (128, [128, 3, 64, 17])])
def test_bulk_shrink(kernels, dtype, fin, pool, ranks):
    """sm_90's prefill shrink without a K split (sgmv_shrink_bulk.cu; the auto dispatch takes it
    for pools of rank 64 and 128, other GPUs and pools run the split-K kernel here): segments whose ends cut 32-row items, a 1-row segment, slot -1, unsorted
    slots, ranks that are not multiples of 16; the same bits on a second run."""
    n = rows_for_bulk_shrink()
    lens = [1000, 33, 1, n - 1734, 700]
    p = make_problem(dtype, fin, 64, ranks, [2, -1, 0, 1, 3], lens, max_rank=pool, seed=fin + pool)
    v = check_shrink(p, 1, AUTO)
    again, _ = run_shrink(p, 1, AUTO)
    assert torch.equal(v.nan_to_num(7.0), again.nan_to_num(7.0))


def _prefill_chain(p, v, y, steps, sync):
    """`steps` shrink + expand pairs back to back on one v and one y, each pair on new rows of x
    and another layer; sync=True waits for each launch to finish before the next starts."""
    xs = [p["x"].roll(i, 0) for i in range(steps)]
    torch.cuda.synchronize()
    for i in range(steps):
        torch.ops.punica.sgmv_shrink(v, xs[i], p["a"], p["indptr_t"], p["slots_t"], p["ranks_t"],
                                     i % 2, AUTO)
        if sync:
            torch.cuda.synchronize()
        torch.ops.punica.sgmv_expand(y, v, p["b"], p["indptr_t"], p["slots_t"], p["ranks_t"],
                                     i % 2, 0, AUTO)
        if sync:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return y


@pytest.mark.parametrize("lens", [[128] * 33, [512] * 8, [2048, 1024, 1000]],
                         ids=["lean", "strips", "long"])
def test_prefill_chain_under_pdl_loses_nothing(kernels, lens):
    """Prefill launches under PDL start before the one before them ends: the bulk shrink issues a's
    copies and each expand reads its metadata (the strips: b too) before waiting. A chain of 12
    shrink + expand pairs on one v and one y (each shrink overwrites the v that the expand before
    it reads; each expand adds into the y the one before wrote) must give the bits of the same
    chain run one launch at a time; a missing wait would lose or mix updates."""
    p = make_problem(torch.bfloat16, 4096, 4096, [64, 16, 64, 33],
                     [i % 4 for i in range(len(lens))], lens, max_rank=64, seed=len(lens))
    n = p["x"].shape[0]
    y0 = torch.randn(n, 4096, device="cuda").to(torch.bfloat16)
    v0 = torch.zeros(n, 64, device="cuda", dtype=torch.bfloat16)
    want = _prefill_chain(p, v0.clone(), y0.clone(), 12, True)
    got = _prefill_chain(p, v0.clone(), y0.clone(), 12, False)
    assert torch.equal(got, want)
    assert not torch.equal(want, y0)


@pytest.mark.parametrize("knobs", [
    {"PUNICA_PREFILL": "mma", "PUNICA_SHRINK_BULK": "0"},
    {"PUNICA_SHRINK_BULK": "1"},
    {"PUNICA_SHRINK_BULK": "1", "PUNICA_SHRINK_PDL": "0"},
    {"PUNICA_EXPAND_LEAN": "0"},
    {"PUNICA_EXPAND_TMA_LOAD": "0"},
    {"PUNICA_EXPAND_STRIP": "1"},
    {"PUNICA_EXPAND_STRIP": "0"},
    {"PUNICA_EXPAND_PDL": "0"},
    {"PUNICA_EXPAND_STRIP": "1", "PUNICA_EXPAND_PDL": "0"},
    {"PUNICA_EXPAND_STRIP": "1", "PUNICA_EXPAND_TMA_LOAD": "0"},
    {"PUNICA_EXPAND_STRIP": "1", "PUNICA_EXPAND_PDL": "0", "PUNICA_EXPAND_TMA_LOAD": "0"}],
    ids=["mma", "bulk-shrink", "bulk-shrink-no-pdl", "expand-not-lean", "expand-no-tma-load",
         "expand-strip", "expand-no-strip", "expand-no-pdl", "expand-strip-no-pdl",
         "expand-strip-no-tma", "expand-strip-plain"])
def test_other_prefill_kernels_still_match(knobs):
    """Knobs read once per process: PUNICA_PREFILL=mma runs the expand on the sgmv_expand.cu
    tensor-core kernel that sm_90 replaced with the pipelined one (and, with
    PUNICA_SHRINK_BULK=0, the shrink on sgmv_shrink.cu's whatever the shapes);
    PUNICA_SHRINK_BULK=1 the bulk shrink for every prefill shape it takes, small ones and rank-16
    pools included (with PUNICA_SHRINK_PDL=0: launched without PDL); PUNICA_EXPAND_PDL=0 both
    expands without PDL; PUNICA_EXPAND_LEAN=0 the pipelined expand without its TMA stores,
    PUNICA_EXPAND_TMA_LOAD=0 without TMA loads of y, PUNICA_EXPAND_STRIP=1 / 0 the column-strip
    expand for every shape / for none (under PDL with y by TMA loads, as by default; without PDL,
    without the TMA loads, without both). The sanitizer cases, in a child."""
    import os
    import subprocess
    env = dict(os.environ, **knobs)
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "sanitizer cases done" in out.stdout, out.stderr[-2000:]


def sanitizer_cases():
    """Small cases of every path (decode, prefill direct and split-K, element loads)."""
    from punica_core.ops import cuda_backend
    assert cuda_backend.available()
    for dtype in DTYPES:
        for path in (SIMT, MMA):
            p = make_problem(dtype, 1032, 1000, [3, 128, 0, 16], SEG_SLOTS, SEG_LENS,
                             max_rank=128)
            check_shrink(p, 1, path)
            check_expand(p, 1, path, col_offset=8, extra_cols=16)
        p = make_problem(dtype, 577, 1001, [5, 16, 128], [2, -1, 0, 1], [3, 1, 200, 1],
                         max_rank=128)
        check_shrink(p, 1, AUTO)
        check_expand(p, 0, AUTO, col_offset=3, extra_cols=5)
        p = make_problem(dtype, 128, 512, [64, 16, 128], [1, 0, 2], [300, 200, 1], max_rank=128)
        check_shrink(p, 0, MMA)
        for pool, ranks in ((64, [64, 16, 40]), (16, [16, 3, 9])):  # split input, rank classes
            p = make_problem(dtype, 4096, 520, ranks, [1, 0, 2], [700, 150, 50], max_rank=pool)
            check_shrink(p, 0, MMA)
            check_expand(p, 1, MMA)
    torch.cuda.synchronize()
    print("sanitizer cases done")


if __name__ == "__main__":
    sanitizer_cases()
