"""The Triton paged decode attention against an fp32 reference built from the block tables.

CUDA tests (marked `cuda`) run on the GPU machine; on CPU the same kernels run in Triton's
interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported), and skip
where triton is not installed (CI)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import capture_cuda_graph
from punica_core.model import attention_triton as at
from punica_core.model.attention import paged_attention_ref
from punica_core.model.config import NAMED_SHAPES
from triton_interpreter import needs_triton, run_in_interpreter

CTX_LENS = [1, 15, 16, 17, 300, 2049]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # atol = rtol


def reference(q, k_cache, v_cache, block_tables, context_lens, block_size, scale):
    """fp32 softmax(q k^T) v per request over its gathered keys; zeros for an empty row."""
    B, H, D = q.shape
    group = H // k_cache.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float32, device=q.device)
    for i in range(B):
        n = int(context_lens[i])
        if n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        rows = block_tables[i, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[rows].float().repeat_interleave(group, dim=1)          # [n, H, D]
        v = v_cache[rows].float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


def make_case(B, H, KVH, D, block_size, ctx_lens, dtype, device, seed=0):
    """Random K/V in a block pool larger than needed; every request gets distinct, shuffled
    (non-contiguous) blocks; table entries past a request's blocks are left as 0."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(max(ctx_lens), 1) // block_size) + 1
    num_blocks = B * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    for i, n in enumerate(ctx_lens):
        nb = -(-n // block_size)
        tables[i, :nb] = perm[i * max_blocks:i * max_blocks + nb].int()
    kc = torch.randn(num_blocks * block_size, KVH, D, generator=g).to(dtype)
    vc = torch.randn(num_blocks * block_size, KVH, D, generator=g).to(dtype)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return [t.to(device) for t in (q, kc, vc, tables, lens)]


def check(q, kc, vc, bt, cl, bs, **kw):
    scale = q.shape[-1] ** -0.5
    got = at.paged_decode_attention(q, kc, vc, bt, cl, bs, scale, **kw)
    want = reference(q, kc, vc, bt, cl, bs, scale)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert torch.isfinite(got).all()
    tol = TOL[q.dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert (got[cl == 0] == 0).all()


# ---- CPU, always ------------------------------------------------------------------------

def test_import_without_gpu_is_safe():
    assert isinstance(at.triton_available(), bool)
    if not torch.cuda.is_available():
        assert at.triton_available() is False


def test_reference_matches_paged_attention_ref():
    """Our block-table reference is the repo's torch reference (decode branch) on a dense
    gather of the same positions."""
    B, H, KVH, D, bs = 5, 9, 3, 16, 8
    lens = [1, 7, 16, 17, 40]
    q, kc, vc, bt, cl = make_case(B, H, KVH, D, bs, lens, torch.float32, "cpu")
    C = max(lens)
    pos = torch.arange(C)
    index = torch.stack([bt[i, pos // bs].long() * bs + pos % bs for i in range(B)])   # [B, C]
    mask = pos[None, :] < cl[:, None]
    layout = SimpleNamespace(decode_rows=torch.arange(B), decode_kv_index=index,
                             decode_kv_mask=mask, prefills=[])
    want = paged_attention_ref(q, kc, vc, layout, D ** -0.5)
    got = reference(q, kc, vc, bt, cl, bs, D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_choose_num_partitions_depends_on_sizes_only():
    assert at.choose_num_partitions(32, 32, 256) == 1
    assert at.choose_num_partitions(1, 32, 4096) == 16          # capped at 256 tokens a piece
    assert at.choose_num_partitions(1, 32, 100) == 1
    assert 1 <= at.choose_num_partitions(7, 3, 2048) <= 8


# The interpreter run: a subprocess so that TRITON_INTERPRET=1 is set before triton loads.
_INTERP_SCRIPT = r"""
import json
import torch
from test_attention_triton import check, make_case

results = []
shapes = [(4, 4, 64), (9, 3, 64), (2, 2, 128), (4, 2, 16)]   # MHA, SmolLM2 GQA, 7B-like, tiny
lens = [1, 15, 16, 17, 0, 70]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for si, (H, KVH, D) in enumerate(shapes):
        bs = (8, 16, 32)[si % 3]
        for parts in (1, None, 3):
            q, kc, vc, bt, cl = make_case(len(lens), H, KVH, D, bs, lens, dtype, "cpu", seed=si)
            check(q, kc, vc, bt, cl, bs, num_partitions=parts)
            results.append([str(dtype), H, KVH, D, bs, parts])
# strided q (a view into a fused qkv row) and a caller-provided out
q, kc, vc, bt, cl = make_case(3, 4, 2, 64, 16, [5, 33, 0], torch.float16, "cpu", seed=9)
qkv = torch.randn(3, 4 * 64 + 2 * 2 * 64).half()
qv = qkv[:, :256].view(3, 4, 64)
qv.copy_(q)
out = torch.full_like(q, float("nan"))
check(qv, kc, vc, bt, cl, 16, out=out, num_partitions=2)
from punica_core.model.attention_triton import paged_decode_attention
assert paged_decode_attention(qv, kc, vc, bt, cl, 16, 0.125, out=out) is out
# the current token's key at the end of a long-ish context, block size 32, split in 4
q, kc, vc, bt, cl = make_case(2, 9, 3, 64, 32, [300, 129], torch.float32, "cpu", seed=3)
check(q, kc, vc, bt, cl, 32, num_partitions=4)
# a context_len past the table's width is clamped to it (never reads past block_tables)
q, kc, vc, bt, cl = make_case(1, 2, 1, 16, 8, [20], torch.float32, "cpu", seed=4)
width = bt.shape[1] * 8
got = paged_decode_attention(q, kc, vc, bt, torch.tensor([10 ** 6], dtype=torch.int32), 8, 0.25)
want = paged_decode_attention(q, kc, vc, bt, torch.tensor([width], dtype=torch.int32), 8, 0.25)
assert torch.equal(got, want)
print("RESULTS " + json.dumps(results))
"""


@needs_triton
def test_interpreter_matches_reference_on_cpu():
    assert len(run_in_interpreter(_INTERP_SCRIPT)) == 36


# ---- CUDA -----------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("B", [1, 7, 32])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("gqa", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_reference_cuda(dtype, head_dim, gqa, block_size, B):
    H, KVH = (8, 8) if gqa == 1 else (9, 3)
    if B == 1:
        batches = [[n] for n in CTX_LENS] + [[0]]
    elif B == 7:
        batches = [CTX_LENS + [0]]
    else:
        g = torch.Generator().manual_seed(B)
        lens = [CTX_LENS[i] for i in torch.randint(len(CTX_LENS), (B,), generator=g)]
        lens[5] = 0
        batches = [lens]
    for lens in batches:
        case = make_case(B, H, KVH, head_dim, block_size, lens, dtype, "cuda", seed=len(lens))
        check(*case, block_size, num_partitions=1)      # single pass
        check(*case, block_size)                        # auto split-K from the table width
        check(*case, block_size, num_partitions=5)      # forced split-K


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-13b", "smollm2-135m", "tiny"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_shapes_cuda(name, dtype):
    if name == "smollm2-135m":
        H, KVH, D = 9, 3, 64
    else:
        cfg = NAMED_SHAPES[name]
        H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lens = [1, 17, 0, 300, 2049, 1000]
    case = make_case(len(lens), H, KVH, D, 16, lens, dtype, "cuda")
    check(*case, 16)
    check(*case, 16, num_partitions=1)


@pytest.mark.cuda
@pytest.mark.parametrize("parts", [1, None, 6])
@pytest.mark.parametrize("shape", [(32, 32, 128), (9, 3, 64)])
def test_cuda_graph_replay_after_inputs_change(shape, parts):
    H, KVH, D = shape
    B, bs, max_ctx = 8, 16, 1024
    dtype = torch.bfloat16
    lens0 = [1, 100, 1024, 0, 17, 512, 16, 999]
    lens1 = [700, 0, 5, 1024, 33, 1, 250, 16]          # a padding row and a 0 -> 700 row
    q, kc, vc, bt, cl = make_case(B, H, KVH, D, bs, lens0, dtype, "cuda", seed=1)
    q1, _, _, bt1, cl1 = make_case(B, H, KVH, D, bs, lens1, dtype, "cuda", seed=2)
    assert bt.shape == bt1.shape and bt1.max() < kc.shape[0] // bs
    scale = D ** -0.5
    out = torch.empty_like(q)
    kw = dict(max_context=max_ctx, num_partitions=parts)
    graph = capture_cuda_graph(                         # compiled + warmed up outside capture
        lambda: at.paged_decode_attention(q, kc, vc, bt, cl, bs, scale, out=out, **kw))
    graph.replay()
    torch.testing.assert_close(out.float(), reference(q, kc, vc, bt, cl, bs, scale),
                               atol=TOL[dtype], rtol=TOL[dtype])
    q.copy_(q1)
    bt.copy_(bt1)
    cl.copy_(cl1)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = reference(q, kc, vc, bt, cl, bs, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.cuda
def test_step_that_prefills_runs_its_decode_rows_through_the_paged_kernel():
    """A continuous-batching step (a prefill chunk beside decode rows): build_layout gives the
    decode rows block tables on CUDA, and the paged kernel on them equals the gather + SDPA
    reference for every row (the chunk's rows keep the reference)."""
    from punica_core.engine.layout import ScheduledChunk, build_layout
    bs, H, KVH, D = 16, 4, 2, 64
    chunks = [ScheduledChunk([1] * 20, 0, [3, 7], -1, True),
              ScheduledChunk([5], 33, [9, 2, 11, 4], 0, True),     # table longer than needed
              ScheduledChunk([6], 4, [5], 0, True)]
    layout = build_layout(chunks, bs, "cuda")
    assert layout.decode_block_tables.dtype == torch.int32
    assert layout.decode_block_tables.shape == (2, 3)
    assert layout.decode_context_lens.tolist() == [34, 5]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(22, H, D, generator=g).cuda()
    kc, vc = (torch.randn(16 * bs, KVH, D, generator=g).cuda() for _ in range(2))
    scale = D ** -0.5
    want = paged_attention_ref(q, kc, vc, layout, scale)
    got = paged_attention_ref(q, kc, vc, layout, scale, decode=lambda qd: at.paged_decode_attention(
        qd, kc, vc, layout.decode_block_tables, layout.decode_context_lens, bs, scale))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
