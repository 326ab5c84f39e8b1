"""Paged attention for prefill chunks (many new tokens per request) as one Triton kernel.

    out = paged_prefill_attention(q, k_cache, v_cache, chunk_starts, chunk_lens, first_pos,
                                  block_tables, block_size, scale, max_chunk_rows=...)

The torch reference (model/attention.py) gathers each chunk's keys into a contiguous tensor
and runs SDPA, a few launches per chunk and per layer, with shapes that follow the chunks: it
cannot be captured in a CUDA graph. Here every chunk of the step is one launch, reading its
keys through its block table, and the grid depends only on host sizes (the number of chunks
and the longest chunk's rows the caller allows for), never on the metadata's values: a graph
captured for a bucket replays correctly after the metadata tensors are changed in place.

Design (prefill is compute-bound: q @ k^T and p @ v on tensor cores):
  * one program per (chunk, tile of BLOCK_M query rows, query head); a tile past its chunk's
    rows exits at once;
  * row j of a chunk sits at position first_pos + j and sees keys 0 .. first_pos + j (its
    earlier context, already in the cache, and the chunk's own keys, written before this runs);
    the loop over BLOCK_N keys stops at the tile's last row's position, the diagonal tile masked;
  * keys and values are gathered a tile at a time through the block table (any block_size);
    online softmax in fp32 (running max, running sum, unnormalised accumulator).
Importing this module never fails: without triton the kernel is not defined.
"""
from __future__ import annotations

import torch

from .attention_triton import _HAVE_TRITON, _pow2, paged_inputs, triton, tl

__all__ = ["paged_prefill_attention"]


if _HAVE_TRITON:
    @triton.jit
    def _prefill_kernel(
        Q, K, V, O, STARTS, LENS, FIRST, BT,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_btc,
        scale, max_tokens,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        c = tl.program_id(0)
        tile = tl.program_id(1)
        h = tl.program_id(2)
        n = tl.load(LENS + c)
        if tile * BLOCK_M >= n:
            return
        start = tl.load(STARTS + c)
        first = tl.load(FIRST + c)
        kvh = h // GROUP
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        q_pos = first + rows                                        # [BLOCK_M]
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + (start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # keys up to the tile's last real row (never past the block table's width)
        end = tl.minimum(first + tl.minimum(n, (tile + 1) * BLOCK_M), max_tokens)
        for kv_start in range(0, end, BLOCK_N):
            pos = kv_start + tl.arange(0, BLOCK_N)                  # [BLOCK_N]
            pos_ok = pos < end
            block = tl.load(BT + c * stride_btc + pos // BLOCK_SIZE, mask=pos_ok, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_mask = pos_ok[:, None] & d_ok[None, :]
            k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0)                    # [BLOCK_N, BLOCK_D]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            see = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
            s = tl.where(see, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing seen yet keep m = -inf: guard the exponentials against nan
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + (start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            chunk_starts: torch.Tensor, chunk_lens: torch.Tensor,
                            first_pos: torch.Tensor, block_tables: torch.Tensor,
                            block_size: int, scale: float, out: torch.Tensor | None = None, *,
                            max_chunk_rows: int, block_m: int | None = None,
                            block_n: int | None = None, num_warps: int | None = None,
                            num_stages: int | None = None) -> torch.Tensor:
    """Causal attention of every prefill chunk over its paged context.

    q: [T, heads, D] (fp16/bf16/fp32); chunk c's queries are rows chunk_starts[c] ..
    + chunk_lens[c], at positions first_pos[c] + j; k_cache, v_cache: one layer, [num_blocks *
    block_size, kv_heads, D], contiguous, already holding the chunks' own keys; block_tables:
    [C, max_blocks] int32 (row c covers positions 0 .. first_pos[c] + chunk_lens[c]);
    chunk_starts, chunk_lens, first_pos: [C] int32 on q's device. Rows of q outside every chunk
    are left as they are in `out` (a new tensor's are undefined). max_chunk_rows: a host bound
    on chunk_lens (it sizes the grid; longer chunks would lose their last rows)."""
    if not _HAVE_TRITON:
        raise RuntimeError("paged_prefill_attention needs triton (pip install triton)")
    T, H, D = q.shape
    KVH = k_cache.shape[1]
    C = chunk_starts.shape[0]
    assert chunk_lens.shape == first_pos.shape == (C,), (chunk_lens.shape, first_pos.shape, C)
    q, block_tables, out = paged_inputs(q, k_cache, v_cache, block_tables, C, out)
    if C == 0 or max_chunk_rows <= 0:
        return out
    block_d = _pow2(max(D, 16))
    block_m = block_m or (64 if block_d <= 64 else 32)
    block_n = block_n or 64
    grid = (C, -(-max_chunk_rows // block_m), H)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, chunk_starts.contiguous(), chunk_lens.contiguous(),
        first_pos.contiguous(), block_tables,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0),
        out.stride(1), block_tables.stride(0),
        float(scale), block_tables.shape[1] * block_size,
        GROUP=H // KVH, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=num_warps or 4, num_stages=num_stages or 2)
    return out
