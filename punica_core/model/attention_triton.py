"""Paged attention for decode steps (one new token per request) as Triton kernels.

    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale)

Graph-safe: the launch grid depends only on host-known sizes (B, heads, the block table's width
or `max_context`), never on the values of `context_lens` / `block_tables`; those are read inside
the kernel, so a captured CUDA graph replays correctly after they are changed in place.

Design (decode is memory-bound: every K/V byte of the context is read exactly once):
  * one program per (request, KV head, partition); it holds the GROUP query heads that share the
    KV head, so each K/V tile is loaded once for all of them (GQA);
  * the loop walks BLOCK_N tokens at a time, mapping each logical position through the block
    table (so any block_size works and BLOCK_N need not equal it), with an online softmax in
    fp32 (running max m, running sum l, unnormalised accumulator acc);
  * split-K (flash-decoding): with P > 1 partitions each request's context is cut into P equal
    pieces *inside the kernel* (from its real context length), each writes (m, l, acc) to an
    fp32 workspace and a second kernel merges them. P itself is chosen on the host from sizes
    only, so the grid stays fixed.
Importing this module never fails: without triton the kernels are simply not defined and
`triton_available()` is False.
"""
from __future__ import annotations

import functools

import torch

try:                                    # triton is optional (CPU-only installs, CI)
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except Exception:                       # noqa: BLE001 - any import failure means "no triton"
    triton = tl = None
    _HAVE_TRITON = False

__all__ = ["triton_available", "paged_decode_attention", "choose_num_partitions"]

_MIN_PART_TOKENS = 256      # below this a partition's work no longer pays for its workspace I/O
_MAX_PARTS = 64


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present. Never raises."""
    try:
        return _HAVE_TRITON and torch.cuda.is_available()
    except Exception:                   # noqa: BLE001
        return False


if _HAVE_TRITON:
    @triton.jit
    def _decode_part_kernel(
        Q, K, V, BT, CL, O, M_WS, L_WS, ACC_WS,
        stride_qb, stride_qh, stride_kt, stride_kh, stride_btb, stride_ob, stride_oh,
        scale, num_heads, num_parts, max_tokens,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP                 # BLOCK_G is GROUP rounded up to a power of 2
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g            # [BLOCK_G] query heads of this KV head
        q_mask = g_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0).to(tl.float32) * scale      # [BLOCK_G, BLOCK_D]

        # Clamp to [0, table width] so a bad context_len can never read past block_tables.
        ctx = tl.maximum(tl.minimum(tl.load(CL + b), max_tokens), 0)
        # Equal pieces of the *real* context, whole tiles each; trailing partitions may be
        # empty (their loop runs zero times and they report m = -inf, l = 0).
        part_tokens = tl.cdiv(tl.cdiv(ctx, num_parts), BLOCK_N) * BLOCK_N
        lo = part * part_tokens
        hi = tl.minimum(lo + part_tokens, ctx)

        m = tl.full([BLOCK_G], -float("inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt_row = BT + b * stride_btb
        kv_col = kvh * stride_kh + offs_d[None, :]                       # [1, BLOCK_D]
        for start in range(lo, hi, BLOCK_N):
            pos = start + offs_n                                         # [BLOCK_N]
            valid = pos < hi
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0)
            # int64: a layer's cache can exceed 2**31 elements.
            rows = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            kv_off = rows[:, None] * stride_kt + kv_col                  # [BLOCK_N, BLOCK_D]
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            if BLOCK_G == 1:        # MHA: stay 2-D, the cheapest layout for the compiler
                s = tl.sum(q * k, axis=1)[None, :]                       # [1, BLOCK_N]
            else:                   # GQA: all heads of the group against the same tile
                s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)        # [BLOCK_G, BLOCK_N]
            s = tl.where(valid[None, :], s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))                     # finite: >=1 valid
            alpha = tl.exp(m - m_new)                                    # exp(-inf) = 0 at start
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if BLOCK_G == 1:
                pv = tl.sum(tl.sum(p, axis=0)[:, None] * v, axis=0)[None, :]   # [1, BLOCK_D]
            else:
                pv = tl.sum(p[:, :, None] * v[None, :, :], axis=1)       # [BLOCK_G, BLOCK_D]
            acc = acc * alpha[:, None] + pv
            m = m_new

        if SPLIT:
            ws = (b * num_heads + heads) * num_parts + part              # [BLOCK_G]
            tl.store(M_WS + ws, m, mask=g_mask)
            tl.store(L_WS + ws, l, mask=g_mask)
            tl.store(ACC_WS + ws[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=q_mask)
        else:
            # l == 0 only for an empty context (a padding row): write zeros, not NaN.
            o = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                     o.to(O.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _decode_reduce_kernel(
        O, M_WS, L_WS, ACC_WS, stride_ob, stride_oh, num_heads, num_parts,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        p_mask = offs_p < num_parts
        d_mask = offs_d < HEAD_DIM
        base = (b * num_heads + h) * num_parts
        m = tl.load(M_WS + base + offs_p, mask=p_mask, other=-float("inf"))   # [BLOCK_P]
        l = tl.load(L_WS + base + offs_p, mask=p_mask, other=0.0)
        acc = tl.load(ACC_WS + (base + offs_p)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=p_mask[:, None] & d_mask[None, :], other=0.0)      # [BLOCK_P, BLOCK_D]
        m_max = tl.max(m, axis=0)
        has = m > -float("inf")     # empty partitions (and all of an empty row) weigh 0, no NaN
        w = tl.where(has, tl.exp(tl.where(has, m - m_max, 0.0)), 0.0)
        denom = tl.sum(w * l, axis=0)
        o = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0, denom, 1.0)
        tl.store(O + b * stride_ob + h * stride_oh + offs_d, o.to(O.dtype.element_ty),
                 mask=d_mask)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """The CUDA device's SM count (cached; also sizes model/lora.py's streamed launches)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_partitions(batch: int, num_kv_heads: int, max_context: int,
                          device: torch.device | None = None) -> int:
    """Split-K factor from sizes only: enough programs to fill the GPU several times over
    (memory-bound: we need many loads in flight), but no partition under ~256 tokens."""
    sms = sm_count(device.index or 0) if device is not None and device.type == "cuda" else 132
    want = -(-8 * sms // max(1, batch * num_kv_heads))
    cap = max(1, -(-max_context // _MIN_PART_TOKENS))
    return max(1, min(want, cap, _MAX_PARTS))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, table_rows: int, out: torch.Tensor | None):
    """The paged kernels' shared checks: q [rows, heads, D], one layer's caches [slots,
    kv_heads, D] (contiguous, heads a multiple of kv_heads), block_tables [table_rows, blocks].
    Returns q and block_tables with unit inner strides, and out ([rows, heads, D] in q's
    dtype: the one given, checked, or a new one)."""
    T, H, D = q.shape
    assert k_cache.shape[2] == D and v_cache.shape == k_cache.shape, \
        (q.shape, k_cache.shape, v_cache.shape)
    assert H % k_cache.shape[1] == 0, f"{H} heads not a multiple of {k_cache.shape[1]} kv heads"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == table_rows, \
        (block_tables.shape, table_rows)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    assert out.shape == (T, H, D) and out.dtype == q.dtype and out.stride(-1) == 1
    return q, block_tables, out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           block_size: int, scale: float, out: torch.Tensor | None = None, *,
                           max_context: int | None = None, num_partitions: int | None = None,
                           block_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None) -> torch.Tensor:
    """Decode attention over a paged KV cache.

    q: [B, heads, D] (fp16/bf16/fp32); k_cache, v_cache: one layer, [num_blocks * block_size,
    kv_heads, D], contiguous; block_tables: [B, max_blocks] int32; context_lens: [B] int32 (0 for
    a padding row gives zeros). Returns out [B, heads, D] in q's dtype (into `out` if given).

    max_context: the longest context expected (host int; default max_blocks * block_size); only
    picks the split-K factor, any real length up to the table's width stays correct.
    num_partitions / block_n / num_warps / num_stages override the defaults (tests, tuning).
    """
    if not _HAVE_TRITON:
        raise RuntimeError("paged_decode_attention needs triton (pip install triton)")
    B, H, D = q.shape
    KVH = k_cache.shape[1]
    assert context_lens.shape == (B,), (context_lens.shape, B)
    q, block_tables, out = paged_inputs(q, k_cache, v_cache, block_tables, B, out)
    context_lens = context_lens.contiguous()
    if B == 0:
        return out

    group = H // KVH
    block_g, block_d = _pow2(group), _pow2(D)
    max_tokens = block_tables.shape[1] * block_size
    if max_context is None:
        max_context = max_tokens
    P = num_partitions or choose_num_partitions(B, KVH, max_context, q.device)
    if block_n is None:
        # Keep the per-iteration fp32 tile (GROUP x BLOCK_N x D) around 4-8K elements so it
        # stays in registers; 16 is the floor for a useful vector of loads.
        budget = 4096 if block_g == 1 else 8192
        block_n = max(16, min(128, _pow2(budget // (block_g * block_d) + 1) // 2))
    if num_warps is None:
        num_warps = 4
    if num_stages is None:
        num_stages = 2
    split = P > 1
    if split:   # fp32 partials; torch.empty is fine under graph capture (the graph's pool)
        m_ws = torch.empty((B, H, P), dtype=torch.float32, device=q.device)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty((B, H, P, D), dtype=torch.float32, device=q.device)
    else:
        m_ws = l_ws = acc_ws = out      # unused by the kernel when SPLIT is False
    _decode_part_kernel[(B, KVH, P)](
        q, k_cache, v_cache, block_tables, context_lens, out, m_ws, l_ws, acc_ws,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        float(scale), H, P, max_tokens,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, SPLIT=split, num_warps=num_warps, num_stages=num_stages)
    if split:
        _decode_reduce_kernel[(B, H)](
            out, m_ws, l_ws, acc_ws, out.stride(0), out.stride(1), H, P,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_P=_pow2(P), num_warps=4 if D >= 128 else 2)
    return out
