"""The Triton paged prefill attention against the torch reference (gather + SDPA per chunk):
chunks that start at position 0 and chunks that continue a context (chunked prefill), GQA,
head sizes that are not a power of two's multiple of the tile, several block sizes, one launch
for all chunks; rows outside the chunks untouched. On CPU through Triton's interpreter (when
triton is installed), on CUDA directly, and replayed from a CUDA graph after its metadata
changed in place. (bf16 on CUDA only: triton's CPU interpreter multiplies bf16 tiles in
tl.dot as garbage.)"""
import json
import random

import pytest
import torch

from punica_core.engine.layout import ScheduledChunk, build_layout
from punica_core.model.attention import paged_attention_ref
from triton_interpreter import needs_triton, run_in_interpreter

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}   # atol = rtol
# (first position, new rows) per chunk: a fresh prompt, continuations, one past a block edge
CHUNKS = [(0, 20), (13, 7), (40, 33), (0, 2), (16, 16)]


def make_case(H, KVH, D, block_size, chunks, dtype, device, seed=0, decode_rows=0):
    """q for the chunks' rows (plus `decode_rows` one-token rows between them, which the
    kernel must leave alone), a random KV cache in shuffled blocks, and the metadata both
    paths need."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    max_ctx = max(f + n for f, n in chunks)
    per = -(-max_ctx // block_size)
    num_blocks = (len(chunks) + decode_rows) * per + 2
    free = list(range(num_blocks))
    rng.shuffle(free)
    sched, starts, row = [], [], 0
    for i, (first, n) in enumerate(chunks):
        if i < decode_rows:     # a decode row before this chunk
            table = [free.pop() for _ in range(per)]
            sched.append(ScheduledChunk([1], 5, table, -1, True))
            row += 1
        table = [free.pop() for _ in range(-(-(first + n) // block_size))]
        sched.append(ScheduledChunk([1] * n, first, table, -1, True))
        starts.append(row)
        row += n
    T = row
    k = torch.randn(num_blocks * block_size, KVH, D, generator=g).to(dtype)
    v = torch.randn(num_blocks * block_size, KVH, D, generator=g).to(dtype)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    prefill = [c for c in sched if len(c.token_ids) > 1]
    width = max(len(c.block_table) for c in prefill)
    tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in prefill],
                          dtype=torch.int32)
    meta = (torch.tensor(starts, dtype=torch.int32),
            torch.tensor([n for _, n in chunks], dtype=torch.int32),
            torch.tensor([f for f, _ in chunks], dtype=torch.int32), tables)
    to = dict(device=device)
    return (q.to(**to), k.to(**to), v.to(**to), *[m.to(**to) for m in meta],
            build_layout(sched, block_size, "cpu"))


def check(q, k, v, starts, lens, first, tables, layout, block_size, **kw):
    from punica_core.model.attention_prefill_triton import paged_prefill_attention
    scale = q.shape[-1] ** -0.5
    want = paged_attention_ref(q.cpu().float(), k.cpu().float(), v.cpu().float(), layout, scale)
    out = torch.full_like(q, 7.0)
    got = paged_prefill_attention(q, k, v, starts, lens, first, tables, block_size, scale,
                                  out=out, max_chunk_rows=int(lens.max()), **kw)
    assert got is out
    tol = TOL[q.dtype]
    rows = torch.cat([torch.arange(int(s), int(s) + int(n)) for s, n in zip(starts, lens)])
    torch.testing.assert_close(got.cpu().float()[rows], want[rows], atol=tol, rtol=tol)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[rows] = False
    assert (got.cpu()[others] == 7.0).all()     # decode rows: not the kernel's to write


_INTERP_SCRIPT = r"""
import json, torch
from test_attention_prefill_triton import make_case, check, CHUNKS
results = []
for dtype in (torch.float32, torch.float16):     # the interpreter's tl.dot garbles bf16
    for si, (H, KVH, D) in enumerate([(4, 4, 64), (9, 3, 64), (2, 1, 24)]):
        bs = (8, 16, 32)[si]
        case = make_case(H, KVH, D, bs, CHUNKS, dtype, "cpu", seed=si, decode_rows=2)
        check(*case, bs, block_m=16, block_n=16)
        results.append([str(dtype), H, KVH, D, bs])
# tiles smaller than a chunk's rows and keys: several tiles per chunk, diagonal tiles masked
case = make_case(4, 2, 32, 16, [(5, 40), (0, 37)], torch.float32, "cpu", seed=7)
check(*case, 16, block_m=16, block_n=32)
print("RESULTS " + json.dumps(results))
"""


@needs_triton
def test_interpreter_matches_reference_on_cpu():
    assert len(run_in_interpreter(_INTERP_SCRIPT)) == 6


# ---- CUDA -----------------------------------------------------------------------------

def _cuda():
    from punica_core.model.attention_triton import triton_available
    if not triton_available():
        pytest.skip("needs CUDA and triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(32, 32, 128), (9, 3, 64), (40, 40, 128)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_matches_reference_cuda(dtype, shape, block_size):
    _cuda()
    H, KVH, D = shape
    chunks = CHUNKS + [(0, 128), (200, 512)]
    case = make_case(H, KVH, D, block_size, chunks, dtype, "cuda", seed=H, decode_rows=3)
    check(*case, block_size)


@pytest.mark.cuda
def test_graph_replays_with_new_metadata():
    """Captured for 3 chunks of at most 64 rows; replayed after the chunks' rows, lengths and
    first positions changed in place (each new chunk a causal prefix-consistent part of the
    old one's context): the same as a fresh call with the new metadata."""
    _cuda()
    from helpers import capture_cuda_graph
    from punica_core.model.attention_prefill_triton import paged_prefill_attention
    q, k, v, starts, lens, first, tables, _ = make_case(
        8, 2, 128, 16, [(0, 64), (30, 9), (7, 50)], torch.bfloat16, "cuda", seed=1)
    out = torch.zeros_like(q)
    graph = capture_cuda_graph(lambda: paged_prefill_attention(
        q, k, v, starts, lens, first, tables, 16, 0.1, out=out, max_chunk_rows=64))
    # contexts covered by the tables: 64, 39, 57 positions
    new = {"starts": [0, 64, 80], "lens": [31, 9, 10], "first": [0, 20, 47]}
    for t, vals in ((starts, new["starts"]), (lens, new["lens"]), (first, new["first"])):
        t.copy_(torch.tensor(vals, dtype=torch.int32))
    out.zero_()
    graph.replay()
    fresh = paged_prefill_attention(q, k, v, starts, lens, first, tables, 16, 0.1,
                                    max_chunk_rows=64)
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(new["starts"], new["lens"])])
    assert torch.equal(out[rows], fresh[rows]) and out[rows].abs().sum() > 0
