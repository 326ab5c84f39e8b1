"""Paged attention, torch reference: decode rows batched in one SDPA, prefill chunks one each.

K/V rows are gathered with index_select on a flat index (on CPU several times cheaper than
advanced indexing with a 2-D index, same values); a chunk that starts at position 0 uses SDPA's
own causal mask instead of building one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..engine.layout import BatchLayout


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        layout: BatchLayout, scale: float,
                        decode: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> torch.Tensor:
    """q: [T, heads, D]; k_cache/v_cache: one layer's [slots, kv_heads, D], already holding this
    step's keys. Returns [T, heads, D]. decode: attention of the decode rows' queries
    ([Bd, heads, D] -> [Bd, heads, D]) by another kernel (the paged Triton one on CUDA)
    instead of a gather + SDPA."""
    out = torch.empty_like(q)
    if layout.decode_rows.numel() and decode is not None:
        out[layout.decode_rows] = decode(q[layout.decode_rows])
    elif layout.decode_rows.numel():
        rows = layout.decode_rows
        idx = layout.decode_kv_index                            # [Bd, C]
        shape = (*idx.shape, *k_cache.shape[1:])
        k = k_cache.index_select(0, idx.reshape(-1)).view(shape)  # [Bd, C, kvh, D]
        v = v_cache.index_select(0, idx.reshape(-1)).view(shape)
        mask = layout.decode_kv_mask[:, None, None, :]          # [Bd, 1, 1, C]
        o = F.scaled_dot_product_attention(
            q[rows].unsqueeze(2),                               # [Bd, heads, 1, D]
            k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale,
            enable_gqa=True)
        out[rows] = o.squeeze(2)
    for ch in layout.prefills:
        qs = q[ch.row_start:ch.row_end].transpose(0, 1)        # [heads, n, D]
        k = k_cache.index_select(0, ch.kv_index).transpose(0, 1)   # [kvh, ctx, D]
        v = v_cache.index_select(0, ch.kv_index).transpose(0, 1)
        n, ctx = qs.shape[1], k.shape[1]
        if ch.first_pos == 0:       # ctx == n: the usual causal mask (SDPA builds none)
            mask, causal = None, True
        else:                       # row j (position first_pos + j) sees keys 0..first_pos + j
            q_pos = torch.arange(ch.first_pos, ch.first_pos + n, device=q.device)
            mask, causal = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None], False
        o = F.scaled_dot_product_attention(qs.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                           attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=True)
        out[ch.row_start:ch.row_end] = o.squeeze(0).transpose(0, 1)
    return out
