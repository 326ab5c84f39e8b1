"""punica::add_lora (the fused decode kernel, the streamed one, and the shrink + expand fallback)
against the torch reference in fp32 on the same rounded inputs.

Needs a GPU (run on the device machine); skipped elsewhere. Weight rows past a slot's rank are
NaN (they must never be read) and y outside each projection's window must stay bit-identical.
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
TOL = {torch.float16: 3e-3, torch.bfloat16: 2.4e-2}
AUTO, SIMT, MMA, FUSED, STREAM, STREAM_LSU = 0, 1, 2, 3, 4, 5
NAN = float("nan")
SPLIT_ROWS = 16   # lora_fused.cu: accumulated jobs of larger ranks run as parts of 16 rank rows


@pytest.fixture(scope="module")
def kernels():
    from punica_core.ops import cuda_backend
    assert cuda_backend.available(), "the CUDA extension did not build or load"
    return cuda_backend


def hopper():
    return torch.cuda.get_device_capability()[0] >= 9


def make(dtype, fin, fouts, ranks_per_proj, seg_slots, seg_lens, *, layers=2, max_rank=128,
         gap=8, seed=0):
    """Projections reading one x, written side by side into y with `gap` columns between."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)
    n = indptr[-1]
    projs, off = [], gap
    for fout, ranks in zip(fouts, ranks_per_proj):
        slots = len(ranks)
        a = torch.randn(slots, layers, max_rank, fin, generator=g, device=dev) / math.sqrt(fin)
        b = torch.randn(slots, layers, max_rank, fout, generator=g, device=dev) / 4
        for s, r in enumerate(ranks):
            a[s, :, r:] = NAN
            b[s, :, r:] = NAN
        projs.append(dict(a=a.to(dtype), b=b.to(dtype), ranks=list(ranks), off=off, fout=fout,
                          ranks_t=torch.tensor(ranks, dtype=torch.int32, device=dev)))
        off += fout + gap
    x = torch.randn(n, fin, generator=g, device=dev).to(dtype)
    y0 = torch.randn(n, off, generator=g, device=dev).to(dtype)
    i32 = lambda t: torch.tensor(t, dtype=torch.int32, device=dev)  # noqa: E731
    return dict(x=x, y0=y0, projs=projs, indptr=indptr, slots=list(seg_slots),
                indptr_t=i32(indptr), slots_t=i32(seg_slots), max_rank=max_rank)


def reference(p, layer):
    ref = p["y0"].float()
    v = torch.zeros(p["x"].shape[0], p["max_rank"], device="cuda")
    for q in p["projs"]:
        torch_ref.sgmv_shrink(v, p["x"].float(), q["a"][:, layer:layer + 1].float(), p["indptr"],
                              p["slots"], q["ranks"], 0)
        torch_ref.sgmv_expand(ref, v, q["b"][:, layer:layer + 1].float(), p["indptr"], p["slots"],
                              q["ranks"], 0, q["off"])
    return ref


def written(p):
    """Elements of y that some projection's delta may change."""
    mask = torch.zeros_like(p["y0"], dtype=torch.bool)
    for q in p["projs"]:
        for i, s in enumerate(p["slots"]):
            if 0 <= s < len(q["ranks"]) and q["ranks"][s] > 0:
                mask[p["indptr"][i]:p["indptr"][i + 1], q["off"]:q["off"] + q["fout"]] = True
    return mask


def run(p, layer, path=AUTO, cluster=0, ctas=0, accumulate=True, x_ready=False, rank_bound=0):
    y = p["y0"].clone()
    v = torch.full((y.shape[0], p["max_rank"]), NAN, dtype=y.dtype, device="cuda")
    torch.ops.punica.add_lora(y, p["x"], v, [q["a"] for q in p["projs"]],
                              [q["b"] for q in p["projs"]], [q["ranks_t"] for q in p["projs"]],
                              [q["off"] for q in p["projs"]], p["indptr_t"], p["slots_t"], layer,
                              path, cluster, accumulate=accumulate, ctas=ctas, x_ready=x_ready,
                              rank_bound=rank_bound)
    return y


def check(p, layer, path=AUTO, cluster=0, ctas=0, x_ready=False, rank_bound=0):
    y = run(p, layer, path, cluster, ctas, x_ready=x_ready, rank_bound=rank_bound)
    ref = reference(p, layer)
    mask = written(p)
    y0 = p["y0"]
    assert torch.equal(y[~mask], y0[~mask]), "add_lora changed y outside its windows"
    if mask.any():
        assert torch.isfinite(y[mask]).all(), "NaN reached y: a weight row past the rank was read"
        delta = ref[mask] - y0[mask].float()
        err = ((y[mask].float() - ref[mask]).norm() / delta.norm().clamp_min(1e-30)).item()
        assert err < TOL[y.dtype], f"relative error of the delta {err:.2e}"
    return y


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or not hopper(),
                                  reason="the fused kernel needs sm_90")

# one decode batch: distinct slots, slot -1, an empty segment, unsorted, repeated slots
SLOTS = [2, -1, 0, 3, 1, 0, 4, 2]
LENS = [1, 1, 0, 1, 1, 1, 1, 1]


@needs_hopper
@pytest.mark.parametrize("path", [FUSED, STREAM, STREAM_LSU])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 2, 3, 4, 8, 15, 16, 17, 32, 64, 100, 128])
def test_every_rank_fused(kernels, path, dtype, rank):
    p = make(dtype, 4096, [4096], [[rank] * 5], SLOTS, LENS)
    check(p, 1, path)


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fin,fouts", [(4096, [4096, 4096, 4096]), (4096, [4096, 1024, 1024]),
                                       (4096, [11008, 11008]), (11008, [4096]),
                                       (576, [576, 192, 192]), (5120, [13824, 13824]),
                                       (28672, [8192]), (8192, [28672])])
@pytest.mark.parametrize("path", [FUSED, STREAM, STREAM_LSU])
def test_sites_of_real_models(kernels, dtype, fin, fouts, path):
    """q/k/v (with GQA), gate/up and down of Llama-2-7B/13B/70B and SmolLM2 in one launch each,
    each projection with its own mix of ranks (rank 0: the adapter does not target it)."""
    mixes = [[16, 0, 64, 128, 4, 8], [8, 16, 0, 128, 64, 4], [128, 4, 16, 0, 8, 64]]
    p = make(dtype, fin, fouts, mixes[:len(fouts)], [0, 1, 2, 3, 4, 5, -1], [1] * 7)
    check(p, 0, path)


@needs_hopper
@pytest.mark.parametrize("ctas", [1, 3, 16, 0, 4096])
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("path", [STREAM, STREAM_LSU])
def test_streamed_grid_sizes(kernels, ctas, accumulate, path):
    """The streamed kernel on a few CTAs (each walks many jobs through its ring of stages,
    the v buffers alternating between them), one per SM (0), or more CTAs than jobs; the auto
    path with ctas > 0 takes it for decode batches."""
    ranks = [[16, 64, 4, 128, 1, 8], [128, 0, 8, 16, 32, 3]]
    slots = [i % 6 for i in range(40)] + [-1, 2]
    p = make(torch.bfloat16, 4096, [4096, 1024], ranks, slots, [1] * 42)
    if accumulate:
        check(p, 0, path, ctas=ctas)
        if ctas:
            check(p, 0, AUTO, ctas=ctas)
        return
    y = torch.full_like(p["y0"], NAN)
    v = torch.empty(y.shape[0], 128, dtype=y.dtype, device="cuda")
    torch.ops.punica.add_lora(y, p["x"], v, [q["a"] for q in p["projs"]],
                              [q["b"] for q in p["projs"]], [q["ranks_t"] for q in p["projs"]],
                              [q["off"] for q in p["projs"]], p["indptr_t"], p["slots_t"], 0,
                              path, 0, True, False, ctas)
    want = reference(dict(p, y0=torch.zeros_like(p["y0"])), 0)
    for q in p["projs"]:
        win = slice(q["off"], q["off"] + q["fout"])
        got, ref = y[:, win].float(), want[:, win]
        assert torch.isfinite(got).all(), "a window element was left unwritten"
        assert ((got - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]


@needs_hopper
@pytest.mark.parametrize("cluster", [1, 2, 4, 8, 16])
def test_every_cluster_size(kernels, cluster):
    p = make(torch.bfloat16, 4096, [4096, 1024], [[16, 64, 4], [128, 0, 8]], [1, 0, 2, -1],
             [1, 1, 1, 1])
    check(p, 0, FUSED, cluster)


@needs_hopper
def test_wide_layers_with_many_jobs(kernels):
    """250 jobs on Llama-2-70B's down projection (28672 -> 8192) with 2 rows each: the auto
    cluster size would be 1, whose slices do not fit shared memory; the launch widens it."""
    ranks = [16, 64, 128, 8]
    p = make(torch.bfloat16, 28672, [8192], [ranks], [i % 4 for i in range(250)], [2] * 250)
    check(p, 0, AUTO)


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[2, 3, 4, 1], [8, 8, 8, 8], [37, 1, 0, 5]])
@pytest.mark.parametrize("path", [FUSED, STREAM, STREAM_LSU])
def test_segments_of_several_rows(kernels, dtype, lens, path):
    """More than one row per segment (fused: 4 rows per pass, the cluster barrier reused;
    streamed: a row after the other)."""
    p = make(dtype, 4096, [4096, 4096], [[16, 32, 128], [64, 16, 8]], [2, 0, 1, 2], lens)
    check(p, 1, path)


@pytest.mark.parametrize("path", [AUTO, SIMT, MMA])
def test_pair_fallback(kernels, path):
    """Prefill-shaped batches (auto) and forced pairs give the same results."""
    p = make(torch.bfloat16, 1024, [2048, 512], [[16, 64], [0, 8]], [1, 0, -1], [200, 64, 3])
    check(p, 0, path)


def test_sizes_without_16_byte_rows(kernels):
    """in/out features not multiples of 8: auto takes the pair's element-load path; the fused
    and streamed kernels refuse them with a message."""
    p = make(torch.float16, 1001, [577, 33], [[16, 5], [3, 128]], [1, 0, -1], [1, 1, 1], gap=3)
    check(p, 0, AUTO)
    if hopper():
        for path in (FUSED, STREAM, STREAM_LSU):
            with pytest.raises(RuntimeError, match="16-byte"):
                run(p, 0, path)


@needs_hopper
def test_fused_matches_the_pair_closely(kernels):
    """The fused kernel rounds v like the pair does: the two agree far inside the tolerance."""
    p = make(torch.bfloat16, 4096, [4096, 4096, 4096], [[16] * 8] * 3, list(range(8)), [1] * 8)
    fused, pair = run(p, 0, FUSED), run(p, 0, SIMT)
    delta = (pair.float() - p["y0"].float()).norm()
    assert ((fused.float() - pair.float()).norm() / delta).item() < 5e-3


@needs_hopper
@pytest.mark.parametrize("path", [FUSED, STREAM, STREAM_LSU])
def test_invalid_slots_and_ranks_touch_nothing(kernels, path):
    p = make(torch.bfloat16, 4096, [4096], [[16, 16]], [5, -7, 1 << 20], [1, 1, 1])
    y = run(p, 0, path)
    assert torch.equal(y, p["y0"])


@needs_hopper
@pytest.mark.parametrize("ctas", [0, 8])
def test_cuda_graph_replay_with_new_slots(kernels, ctas):
    """ctas 8: the streamed kernel (auto path), as lora_overlap's placement captures it."""
    dtype = torch.bfloat16
    p = make(dtype, 4096, [4096, 1024, 1024], [[16, 64, 8, 128]] * 3, [0, 1, 2, 3] * 4, [1] * 16)
    y = p["y0"].clone()
    v = torch.zeros(16, 128, dtype=dtype, device="cuda")
    x, slot_t = p["x"].clone(), p["slots_t"].clone()
    args = ([q["a"] for q in p["projs"]], [q["b"] for q in p["projs"]],
            [q["ranks_t"] for q in p["projs"]], [q["off"] for q in p["projs"]])

    def step():
        torch.ops.punica.add_lora(y, x, v, *args, p["indptr_t"], slot_t, 1, ctas=ctas)

    from helpers import capture_cuda_graph
    graph = capture_cuda_graph(step)
    new_slots = [3, 2, 1, 0, -1] + [1] * 11
    x.copy_(torch.randn(x.shape, device="cuda").to(dtype))
    slot_t.copy_(torch.tensor(new_slots, dtype=torch.int32))
    y.copy_(p["y0"])
    graph.replay()
    torch.cuda.synchronize()
    q = dict(p, x=x, slots=new_slots)
    ref = reference(q, 1)
    mask = written(q)
    assert torch.equal(y[~mask], p["y0"][~mask])
    delta = ref[mask] - p["y0"][mask].float()
    assert ((y[mask].float() - ref[mask]).norm() / delta.norm()).item() < TOL[dtype]


def test_torch_compile_fullgraph(kernels):
    p = make(torch.float16, 1024, [2048, 1024], [[16, 32], [8, 0]], [1, 0], [1, 1])
    args = ([q["a"] for q in p["projs"]], [q["b"] for q in p["projs"]],
            [q["ranks_t"] for q in p["projs"]], [q["off"] for q in p["projs"]])

    @torch.compile(fullgraph=True)
    def lora(y, x, v, indptr, slots):
        torch.ops.punica.add_lora(y, x, v, *args, indptr, slots, 0)
        return y * 1

    v = torch.zeros(2, 128, dtype=torch.float16, device="cuda")
    out = lora(p["y0"].clone(), p["x"], v, p["indptr_t"], p["slots_t"])
    ref = reference(p, 0)
    assert ((out.float() - ref).norm() / (ref - p["y0"].float()).norm()).item() < TOL[torch.float16]


def test_public_op_uses_cuda_and_matches_the_reference(kernels):
    from punica_core import ops
    p = make(torch.bfloat16, 4096, [4096, 4096], [[16, 8], [0, 16]], [1, 0, -1], [1, 1, 1])
    projs = [(q["a"], q["b"], q["ranks_t"], q["off"]) for q in p["projs"]]
    v = torch.zeros(3, 128, dtype=torch.bfloat16, device="cuda")
    y = ops.add_lora(p["y0"].clone(), p["x"], v, projs, p["indptr_t"], p["slots_t"], 1)
    ref = reference(p, 1)
    assert ((y.float() - ref).norm() / (ref - p["y0"].float()).norm()).item() < TOL[torch.bfloat16]


@pytest.mark.parametrize("case,match", [
    ("lists", "one entry per projection"), ("five", "1 to 4 projections"),
    ("window", "do not fit in y"), ("cpu_x", "must be a CUDA tensor"),
    ("dtype", "one dtype"), ("fin", "in_features"), ("path", "path must be"),
    ("v_narrow", "fewer than the max rank"), ("layer", "out of range"), ("ctas", "ctas must be"),
])
def test_rejects_bad_arguments(kernels, case, match):
    p = make(torch.bfloat16, 1024, [1024], [[16, 16]], [0, 1], [1, 1])
    q = p["projs"][0]
    y, x = p["y0"].clone(), p["x"]
    v = torch.zeros(2, 128, dtype=x.dtype, device="cuda")
    a, b, r, off, layer, path, ctas = [q["a"]], [q["b"]], [q["ranks_t"]], [q["off"]], 0, AUTO, 0
    if case == "lists":
        b = b * 2
    elif case == "five":
        a, b, r, off = a * 5, b * 5, r * 5, off * 5
    elif case == "window":
        off = [y.shape[1] - 8]
    elif case == "cpu_x":
        x = x.cpu()
    elif case == "dtype":
        y = y.half()
    elif case == "fin":
        x = torch.zeros(2, 512, dtype=x.dtype, device="cuda")
    elif case == "path":
        path = 7
    elif case == "ctas":
        ctas = -1
    elif case == "v_narrow":
        v = v[:, :8]
    elif case == "layer":
        layer = 2
    with pytest.raises(RuntimeError, match=match):
        torch.ops.punica.add_lora(y, x, v, a, b, r, off, p["indptr_t"], p["slots_t"], layer, path,
                                  ctas=ctas)
    torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("path", [AUTO, SIMT, FUSED, STREAM, STREAM_LSU])
@pytest.mark.parametrize("ranks", [[16] * 5, [4, 8, 16, 64, 128]])     # staged and streamed
def test_store_mode_overwrites_the_windows(kernels, path, ranks):
    """accumulate=False (lora_overlap's delta buffer): every window row of the segments is
    written, with zeros for rows without an adapter, whatever y held; the gaps stay."""
    if path in (FUSED, STREAM, STREAM_LSU) and not hopper():
        pytest.skip("the fused and streamed kernels need sm_90")
    dtype = torch.bfloat16
    p = make(dtype, 4096, [4096, 1024, 1024], [ranks] * 3, SLOTS, LENS)
    zero = dict(p, y0=torch.zeros_like(p["y0"]))
    want = reference(zero, 1)
    y = torch.full_like(p["y0"], NAN)
    for q in p["projs"]:            # the gaps between windows keep what they held
        y[:, q["off"] - 8:q["off"]] = p["y0"][:, q["off"] - 8:q["off"]]
    gaps = ~torch.isnan(y)
    v = torch.empty(y.shape[0], p["max_rank"], dtype=dtype, device="cuda")
    torch.ops.punica.add_lora(y, p["x"], v, [q["a"] for q in p["projs"]],
                              [q["b"] for q in p["projs"]], [q["ranks_t"] for q in p["projs"]],
                              [q["off"] for q in p["projs"]], p["indptr_t"], p["slots_t"], 1,
                              path, 0, True, False)
    assert torch.equal(y[gaps], p["y0"][gaps])
    windows = torch.zeros_like(gaps)
    for q in p["projs"]:
        windows[:, q["off"]:q["off"] + q["fout"]] = True
    assert torch.isfinite(y[windows]).all(), "a window element was left unwritten"
    mask = written(p)
    assert torch.equal(y[windows & ~mask], torch.zeros_like(y[windows & ~mask]))
    err = ((y[mask].float() - want[mask]).norm() / want[mask].norm()).item()
    assert err < TOL[dtype], f"relative error of the delta {err:.2e}"


# -- x_ready: the fused kernel computes the delta before its dependency wait --------------------
@needs_hopper
@pytest.mark.parametrize("ranks", [[16] * 5, [4, 8, 16, 64, 128]])     # staged and streamed
@pytest.mark.parametrize("lens", [LENS, [2, 3, 4, 1, 8, 1, 0, 5]])     # decode, several rows
@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("cluster", [0, 1, 16])
def test_x_ready_gives_the_same_bits(kernels, ranks, lens, accumulate, cluster):
    """Only where the work happens changes, not the sums or their rounding. Accumulated jobs of
    ranks above 16 run as split parts whose reductions into y land in any order: their rows are
    compared within rounding, the single-part rows bit for bit."""
    p = make(torch.bfloat16, 4096, [4096, 1024, 1024], [ranks] * 3, SLOTS, lens)
    want = run(p, 1, FUSED, cluster, accumulate=accumulate)
    got = run(p, 1, FUSED, cluster, accumulate=accumulate, x_ready=True)
    exact = torch.ones(want.shape[0], dtype=torch.bool, device="cuda")
    if accumulate:
        for i, s in enumerate(p["slots"]):
            if 0 <= s < len(ranks) and ranks[s] > SPLIT_ROWS:
                exact[p["indptr"][i]:p["indptr"][i + 1]] = False
    assert exact.any()
    assert torch.equal(got[exact], want[exact])
    close = (got[~exact].float() - want[~exact].float()).abs()
    assert (close <= 2 ** -4 * want[~exact].float().abs().clamp_min(1.0)).all()
    check(p, 1, FUSED, cluster)


def _chain(p, layers, x_ready, via_copy):
    """A CUDA graph of add_lora launches on one y; via_copy: each launch's x is the previous
    result, copied by a torch kernel (x is then final before the launch, as x_ready requires)."""
    y = p["y0"].clone()
    x = p["x"].clone()
    v = torch.empty(y.shape[0], p["max_rank"], dtype=y.dtype, device="cuda")
    args = ([q["a"] for q in p["projs"]], [q["b"] for q in p["projs"]],
            [q["ranks_t"] for q in p["projs"]], [q["off"] for q in p["projs"]])
    fin = x.shape[1]

    def body():
        for layer in layers:
            if via_copy:
                x.copy_(y[:, 8:8 + fin])
            torch.ops.punica.add_lora(y, x, v, *args, p["indptr_t"], p["slots_t"], layer, FUSED,
                                      x_ready=x_ready)

    from helpers import capture_cuda_graph
    graph = capture_cuda_graph(body)
    y.copy_(p["y0"])
    x.copy_(p["x"])
    graph.replay()
    torch.cuda.synchronize()
    return y


@needs_hopper
@pytest.mark.parametrize("via_copy", [False, True])
def test_x_ready_launches_still_wait_for_y(kernels, via_copy):
    """40 launches back to back, each adding into the y the one before wrote (through PDL):
    with x_ready every launch computes early but must still read y only after the one before
    has finished; a missing wait would lose updates (the bits would differ from the chain
    without x_ready)."""
    p = make(torch.bfloat16, 4096, [4096], [[16] * 32], list(range(32)), [1] * 32, layers=4,
             max_rank=16)
    layers = [i % 4 for i in range(40)]
    want = _chain(p, layers, False, via_copy)
    got = _chain(p, layers, True, via_copy)
    assert not torch.equal(want, p["y0"])
    assert torch.equal(got, want)


@needs_hopper
@pytest.mark.parametrize("x_ready", [False, True])
def test_split_jobs_in_a_chain_lose_no_update(kernels, x_ready):
    """Ranks above 16 run as parts of 16 rank rows, each adding its delta to y by reductions; a
    part that returned early (past its job's rank) waits for nothing. 40 launches back to back
    on one y: every launch's every part must land (one lost delta of 40 is ~15% of the sum,
    fp16 roundings of y stay under 1%)."""
    ranks = [128, 64, 100, 17, 16, 4, 33, 0]
    p = make(torch.float16, 4096, [4096], [ranks], [0, 1, 2, 3, 4, 5, 6, 7, -1, 0], [1] * 10,
             layers=4, max_rank=128)
    layers = [i % 4 for i in range(40)]
    want = p["y0"].float()
    for layer in layers:
        want += reference(p, layer) - p["y0"].float()
    got = _chain(p, layers, x_ready, False)
    mask = written(p)
    assert torch.equal(got[~mask], p["y0"][~mask])
    err = ((got[mask].float() - want[mask]).norm() / (want[mask] - p["y0"][mask].float()).norm())
    assert err.item() < 3e-2, f"relative error of the summed deltas {err.item():.2e}"


@needs_hopper
@pytest.mark.parametrize("bound", [16, 32, 64, 128])
@pytest.mark.parametrize("x_ready", [False, True])
@pytest.mark.parametrize("lens", [LENS, [2, 3, 4, 1, 8, 1, 0, 5]])
def test_rank_bound_shapes_the_launch_and_a_rank_above_it_still_counts(kernels, bound, x_ready,
                                                                        lens):
    """rank_bound 16 with ranks up to 128 in the batch: the launch is shaped for rank 16 (whole
    jobs, 16 staged rows), and the jobs above it still add their whole delta (their rows past
    the staged block go through the chunked ring); 32 / 64: split parts, the last one taking
    the rest."""
    p = make(torch.bfloat16, 4096, [4096, 1024, 1024], [[4, 8, 16, 64, 128]] * 3, SLOTS, lens)
    check(p, 1, FUSED, x_ready=x_ready, rank_bound=bound)


def test_rank_bound_out_of_range_is_refused(kernels):
    p = make(torch.bfloat16, 256, [256], [[16]], [0], [1])
    with pytest.raises(RuntimeError, match="rank_bound"):
        run(p, 0, AUTO, rank_bound=129)
