"""The small elementwise ops of a Llama layer fused into one Triton launch each.

    y = rms_norm(x, w, eps)                         # RMSNorm (HF Llama rounding order)
    y, x = add_rms_norm(x, delta, w, eps, inplace)  # residual add + RMSNorm
    m = silu_mul(gu)                                # SwiGLU on the fused gate_up output
    q = rotary_qk_and_cache(qkv, cos, sin, k_cache, v_cache, slot_mapping, H, KVH, D)

add_rms_norm, silu_mul and rotary_qk_and_cache take an optional `lora_delta` (the shape of
their projection input): it is added first, rounded like `y.add_(lora_delta)`, so a LoRA delta
computed beside the base projection (EngineConfig.lora_overlap) costs no kernel of its own.

Why: a decode step at batch 32 spends more time launching ~35 tiny torch kernels per layer
(norm in 5 ops, rotary with slices + cat, two index_copy_, silu, mul, adds) than on them;
these four replace them. All are memory-bound, so one program streams a row (or a tile of a
row, or a few heads of a token) once, with fp32 math. Each one *emulates torch's roundings*
(cast to the tensor dtype exactly where the torch reference rounds), so in fp16/bf16 nearly
every element is bit-identical to the reference; the rest differ by one ulp (reduction order,
rsqrt/exp approximations).

Graph-safe: grids depend on shapes only; slot_mapping is read inside the kernel; outputs come
from torch.empty (the graph's pool under capture). No host syncs.

`*_torch` are the torch references with the same signatures (the CPU path); `fused_ops(device)`
picks the Triton or the torch set. Importing this module never fails: without triton the
kernels are not defined and `triton_available()` is False.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .rope import apply_rotary

try:                                    # triton is optional (CPU-only installs, CI)
    import triton
    import triton.language as tl
    _HAVE_TRITON = True
except Exception:                       # noqa: BLE001 - any import failure means "no triton"
    triton = tl = None
    _HAVE_TRITON = False

__all__ = ["triton_available", "rms_norm", "add_rms_norm", "silu_mul", "rotary_qk_and_cache",
           "rms_norm_torch", "add_rms_norm_torch", "silu_mul_torch",
           "rotary_qk_and_cache_torch", "fused_ops"]

_MAX_ROW = 32768        # rms_norm keeps the whole row in registers (Llama hidden sizes <= 8192)
_SILU_BLOCK = 1024      # silu_mul tiles the intermediate dim (up to 28672)


def triton_available() -> bool:
    """True when triton imports and a CUDA device is present. Never raises."""
    try:
        return _HAVE_TRITON and torch.cuda.is_available()
    except Exception:                   # noqa: BLE001
        return False


# ---- torch references (also the CPU path) ----------------------------------------------------

def rms_norm_torch(x, weight, eps):
    """Exactly llama.rms_norm: normalise in fp32, round to x.dtype, then multiply by weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(x, delta, weight, eps, inplace=False, lora_delta=None):
    if lora_delta is not None:
        delta = delta + lora_delta
    x = x.add_(delta) if inplace else x + delta
    return rms_norm_torch(x, weight, eps), x


def silu_mul_torch(gu, lora_delta=None):
    if lora_delta is not None:
        gu = gu + lora_delta
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_qk_and_cache_torch(qkv, cos, sin, k_cache, v_cache, slot_mapping,
                              num_heads, num_kv_heads, head_dim, lora_delta=None):
    """What LlamaModel.forward does between the qkv projection and attention."""
    if lora_delta is not None:
        qkv = qkv + lora_delta
    T = qkv.shape[0]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q = apply_rotary(q.view(T, num_heads, head_dim), cos, sin)
    k = apply_rotary(k.view(T, num_kv_heads, head_dim), cos, sin)
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v.view(T, num_kv_heads, head_dim))
    return q


# ---- kernels ---------------------------------------------------------------------------------

if _HAVE_TRITON:
    @triton.jit
    def _rms_norm_kernel(X, DELTA, LD, W, Y, XN, stride_x, stride_d, stride_ld, stride_y,
                         stride_xn, n_cols, eps, HAS_DELTA: tl.constexpr, HAS_LD: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_LD:      # the projection's LoRA delta first: torch's `delta += lora_delta`
                ld = tl.load(LD + row * stride_ld + cols, mask=mask, other=0.0).to(tl.float32)
                d = (d + ld).to(XN.dtype.element_ty).to(tl.float32)
            s = (x + d).to(XN.dtype.element_ty)     # torch's `x + delta` rounds here
            tl.store(XN + row * stride_xn + cols, s, mask=mask)     # XN may be X (in place)
            x = s.to(tl.float32)                    # the norm sees the rounded residual
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        y = (x * r).to(X.dtype.element_ty).to(tl.float32)           # round, *then* weight
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (y * w).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(GU, LD, M, stride_gu, stride_ld, stride_m, n_cols,
                         HAS_LD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        src = GU + row * stride_gu + cols
        g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(src + n_cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_LD:          # gu + lora_delta, rounded as torch's add
            lsrc = LD + row * stride_ld + cols
            lg = tl.load(lsrc, mask=mask, other=0.0).to(tl.float32)
            lu = tl.load(lsrc + n_cols, mask=mask, other=0.0).to(tl.float32)
            g = (g + lg).to(M.dtype.element_ty).to(tl.float32)
            u = (u + lu).to(M.dtype.element_ty).to(tl.float32)
        # torch rounds silu(gate) to the dtype before the multiply; so do we
        s = (g / (1.0 + tl.exp(-g))).to(M.dtype.element_ty).to(tl.float32)
        tl.store(M + row * stride_m + cols, (s * u).to(M.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_cache_kernel(QKV, LD, COS, SIN, SLOTS, QO, KC, VC,
                             stride_qkv, stride_ld, stride_cos, stride_sin, stride_kc, stride_kch,
                             stride_vc, stride_vch,
                             NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr,
                             BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                             HAS_LD: tl.constexpr):
        # One program: token t, BLOCK_H heads of the combined index hh over [q heads | k heads].
        # qkv's row is [q | k | v], so q head h and k head j both start at hh * D.
        t = tl.program_id(0).to(tl.int64)
        hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)      # [BLOCK_H]
        d = tl.arange(0, BLOCK_HALF)                                 # [BLOCK_HALF]
        d_ok = d < HALF
        is_q = hh < NUM_HEADS
        is_k = (hh >= NUM_HEADS) & (hh < NUM_HEADS + NUM_KV)
        dt = QO.dtype.element_ty
        row = QKV + t * stride_qkv
        src = row + hh[:, None] * (2 * HALF) + d[None, :]            # [BLOCK_H, BLOCK_HALF]
        m = (is_q | is_k)[:, None] & d_ok[None, :]
        x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
        lrow = LD + t * stride_ld
        if HAS_LD:          # qkv + lora_delta, rounded as torch's add
            lsrc = lrow + hh[:, None] * (2 * HALF) + d[None, :]
            x1 = (x1 + tl.load(lsrc, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (x2 + tl.load(lsrc + HALF, mask=m, other=0.0).to(tl.float32)).to(dt).to(
                tl.float32)
        # apply_rotary casts cos/sin to x.dtype and rounds after every multiply and add
        c = tl.load(COS + t * stride_cos + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
        s = tl.load(SIN + t * stride_sin + d, mask=d_ok, other=0.0).to(dt).to(tl.float32)
        c = c[None, :]                                               # [1, BLOCK_HALF]
        s = s[None, :]
        o1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)

        qdst = QO + t * (NUM_HEADS * 2 * HALF) + hh[:, None] * (2 * HALF) + d[None, :]
        qm = is_q[:, None] & d_ok[None, :]
        tl.store(qdst, o1, mask=qm)
        tl.store(qdst + HALF, o2, mask=qm)

        slot = tl.load(SLOTS + t).to(tl.int64)      # int64: a layer's cache can pass 2**31
        j = hh - NUM_HEADS                          # kv head (negative, masked, for q heads)
        # a negative slot writes nothing (compared per head: a scalar mask is refused by
        # newer Triton interpreters)
        km = (is_k & ((hh * 0 + slot) >= 0))[:, None] & d_ok[None, :]
        kdst = KC + slot * stride_kc + j[:, None] * stride_kch + d[None, :]
        tl.store(kdst, o1, mask=km)
        tl.store(kdst + HALF, o2, mask=km)
        vsrc = row + (hh + NUM_KV)[:, None] * (2 * HALF) + d[None, :]   # v head j, unrotated
        v1 = tl.load(vsrc, mask=km, other=0.0)
        v2 = tl.load(vsrc + HALF, mask=km, other=0.0)
        if HAS_LD:
            lvsrc = lrow + (hh + NUM_KV)[:, None] * (2 * HALF) + d[None, :]
            v1 = (v1.to(tl.float32) + tl.load(lvsrc, mask=km, other=0.0).to(tl.float32)).to(dt)
            v2 = (v2.to(tl.float32) + tl.load(lvsrc + HALF, mask=km, other=0.0).to(
                tl.float32)).to(dt)
        vdst = VC + slot * stride_vc + j[:, None] * stride_vch + d[None, :]
        tl.store(vdst, v1, mask=km)
        tl.store(vdst + HALF, v2, mask=km)


def _need_triton(name):
    if not _HAVE_TRITON:
        raise RuntimeError(f"{name} needs triton (pip install triton); use {name}_torch")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _row_warps(block: int) -> int:
    # ~512 elements a warp keeps a row's registers small while putting many loads in flight
    return max(1, min(16, block // 512))


def _lora_delta_arg(lora_delta, like: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel reads as its LD argument: lora_delta (checked against like, the
    tensor it is added to), or like itself as a never-read placeholder when there is none."""
    if lora_delta is None:
        return like
    assert (lora_delta.shape == like.shape and lora_delta.dtype == like.dtype
            and lora_delta.stride(-1) == 1), \
        (like.shape, like.dtype, lora_delta.shape, lora_delta.dtype, lora_delta.stride())
    return lora_delta


def _norm(x, delta, weight, eps, xn, lora_delta=None):
    T, H = x.shape
    assert x.stride(-1) == 1 and weight.shape == (H,) and weight.is_contiguous(), \
        (x.shape, x.stride(), weight.shape)
    assert H <= _MAX_ROW, f"rms_norm holds a row in one block; {H} > {_MAX_ROW}"
    y = torch.empty((T, H), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if T == 0:
        return y
    block = _pow2(H)
    d = delta if delta is not None else x
    ld = _lora_delta_arg(lora_delta, d)
    n = xn if xn is not None else x
    _rms_norm_kernel[(T,)](x, d, ld, weight, y, n, x.stride(0), d.stride(0), ld.stride(0),
                           y.stride(0), n.stride(0), H, float(eps), HAS_DELTA=delta is not None,
                           HAS_LD=lora_delta is not None, BLOCK=block,
                           num_warps=_row_warps(block))
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] fp16/bf16/fp32, last dim contiguous (rows may be strided); weight: [H].
    Returns a new contiguous [T, H] in promote(x.dtype, weight.dtype), like llama.rms_norm."""
    _need_triton("rms_norm")
    return _norm(x, None, weight, eps, None)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 inplace: bool = False, lora_delta: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: x_new = x + delta (rounded to x.dtype), y = rms_norm(x_new).

    x, delta: [T, H] of one dtype, last dim contiguous. inplace=True writes x_new into x and
    returns x itself as x_new (the caller must not need the old x); otherwise x_new is a new
    contiguous tensor. Returns (y, x_new)."""
    _need_triton("add_rms_norm")
    assert delta.shape == x.shape and delta.dtype == x.dtype and delta.stride(-1) == 1, \
        (x.shape, x.dtype, delta.shape, delta.dtype)
    xn = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _norm(x, delta, weight, eps, xn, lora_delta), xn


def silu_mul(gu: torch.Tensor, lora_delta: torch.Tensor | None = None) -> torch.Tensor:
    """gu: [T, 2I] (gate | up, as gu.chunk(2, -1)), last dim contiguous. Returns a new
    [T, I] silu(gate) * up in gu.dtype, rounding after silu like torch does."""
    _need_triton("silu_mul")
    T, I2 = gu.shape
    assert I2 % 2 == 0 and gu.stride(-1) == 1, (gu.shape, gu.stride())
    inter = I2 // 2
    ld = _lora_delta_arg(lora_delta, gu)
    m = torch.empty((T, inter), dtype=gu.dtype, device=gu.device)
    if T == 0:
        return m
    block = min(_SILU_BLOCK, _pow2(inter))
    _silu_mul_kernel[(T, triton.cdiv(inter, block))](
        gu, ld, m, gu.stride(0), ld.stride(0), m.stride(0), inter,
        HAS_LD=lora_delta is not None, BLOCK=block, num_warps=max(1, block // 256))
    return m


def rotary_qk_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                        num_heads: int, num_kv_heads: int, head_dim: int,
                        lora_delta: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on q and k of the fused projection output, K/V stored into one layer's cache.

    qkv: [T, (H + 2 KVH) D] (last dim contiguous); cos, sin: [T, D/2] fp32 (RotaryTable.lookup);
    k_cache, v_cache: [slots, KVH, D] (last dim contiguous); slot_mapping: [T] int64 (int32
    works), a negative slot writes nothing (the torch reference would raise instead).
    Writes rotated k and raw v at k_cache[slot_mapping], v_cache[slot_mapping]; returns the
    rotated q as a new [T, H, D] tensor. Same rounding as rope.apply_rotary."""
    _need_triton("rotary_qk_and_cache")
    T = qkv.shape[0]
    H, KVH, D = num_heads, num_kv_heads, head_dim
    assert D % 2 == 0 and qkv.shape == (T, (H + 2 * KVH) * D) and qkv.stride(-1) == 1, \
        (qkv.shape, H, KVH, D)
    assert cos.shape == sin.shape == (T, D // 2) and cos.stride(-1) == sin.stride(-1) == 1
    for c in (k_cache, v_cache):
        assert c.shape[1:] == (KVH, D) and c.stride(-1) == 1 and c.dtype == qkv.dtype, \
            (c.shape, c.dtype, qkv.dtype)
    assert slot_mapping.shape == (T,), slot_mapping.shape
    slot_mapping = slot_mapping.contiguous()
    ld = _lora_delta_arg(lora_delta, qkv)
    q = torch.empty((T, H, D), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    half = D // 2
    block_half = _pow2(half)
    block_h = min(_pow2(H + KVH), max(1, 1024 // block_half))    # ~2K elements per program
    grid = (T, triton.cdiv(H + KVH, block_h))
    _rotary_cache_kernel[grid](
        qkv, ld, cos, sin, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), ld.stride(0), cos.stride(0), sin.stride(0), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        NUM_HEADS=H, NUM_KV=KVH, HALF=half, BLOCK_HALF=block_half, BLOCK_H=block_h,
        HAS_LD=lora_delta is not None, num_warps=4 if block_h * block_half >= 1024 else 2)
    return q


def fused_ops(device) -> SimpleNamespace:
    """The Triton functions on a CUDA device with triton installed, else the torch ones."""
    if torch.device(device).type == "cuda" and triton_available():
        return SimpleNamespace(rms_norm=rms_norm, add_rms_norm=add_rms_norm, silu_mul=silu_mul,
                               rotary_qk_and_cache=rotary_qk_and_cache)
    return SimpleNamespace(rms_norm=rms_norm_torch, add_rms_norm=add_rms_norm_torch,
                           silu_mul=silu_mul_torch, rotary_qk_and_cache=rotary_qk_and_cache_torch)
