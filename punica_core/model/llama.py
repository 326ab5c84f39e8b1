"""A Llama-family decoder written for batches of token rows from many requests.

Fused qkv and gate_up projections; LoRA deltas on all seven projections via LoraContext;
paged KV cache. RMSNorm, RoPE, grouped-query attention, SwiGLU as in Hugging Face's Llama.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.layout import BatchLayout
from .attention import paged_attention_ref
from .config import ModelConfig
from .kv_cache import KVCache
from .linear import linear
from .lora import LoraContext
from .rope import RotaryTable, apply_rotary

QKV, O, GATE_UP, DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), \
    ("gate_proj", "up_proj"), ("down_proj",)


@dataclass
class LayerWeights:
    input_norm: torch.Tensor        # [H]
    qkv: torch.Tensor               # [q + 2kv, H]
    qkv_bias: torch.Tensor | None   # [q + 2kv]
    o: torch.Tensor                 # [H, q]
    post_norm: torch.Tensor         # [H]
    gate_up: torch.Tensor           # [2I, H]
    down: torch.Tensor              # [H, I]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor, max_positions: int):
        self.cfg = cfg
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.device, self.dtype = embed.device, embed.dtype
        self.rope = RotaryTable(cfg, max_positions, self.device)
        self.scale = cfg.head_dim ** -0.5

    def to(self, device, dtype=None) -> "LlamaModel":
        """A copy of the model on another device (and dtype), e.g. CPU-drawn random weights."""
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)
        layers = [LayerWeights(**{k: mv(v) for k, v in vars(lw).items()}) for lw in self.layers]
        embed = mv(self.embed)
        lm_head = embed if self.lm_head is self.embed else mv(self.lm_head)
        return LlamaModel(self.cfg, embed, layers, mv(self.norm), lm_head,
                          self.rope.cos.shape[0])

    @property
    def weight_bytes(self) -> int:
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _attention(self, q, kv: KVCache, layer: int, layout: BatchLayout) -> torch.Tensor:
        """q: [T, heads, D] -> [T, heads, D]."""
        if layout.block_tables is not None:     # decode-only step: the Triton paged kernel
            from .attention_triton import paged_decode_attention
            return paged_decode_attention(q, kv.k[layer], kv.v[layer], layout.block_tables,
                                          layout.context_lens, kv.block_size, self.scale)
        return paged_attention_ref(q, kv.k[layer], kv.v[layer], layout, self.scale)

    @torch.inference_mode()
    def forward(self, layout: BatchLayout, kv: KVCache, lora: LoraContext | None) -> torch.Tensor:
        """Runs every row of the step; returns float32 logits of layout.logit_rows: [B, V]."""
        cfg = self.cfg
        T = layout.num_rows
        x = self.embed[layout.input_ids]                            # [T, H]
        cos, sin = self.rope.lookup(layout.positions)               # [T, D/2]
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw.input_norm, cfg.rms_norm_eps)
            qkv = linear(h, lw.qkv, lw.qkv_bias)                    # [T, q + 2kv]
            if lora is not None:
                lora.apply(qkv, h, i, QKV)
            q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = apply_rotary(q.view(T, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rotary(k.view(T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            kv.write(i, layout.slot_mapping, k, v.view(T, cfg.num_kv_heads, cfg.head_dim))
            attn = self._attention(q, kv, i, layout)
            attn = attn.reshape(T, cfg.q_size)
            o = linear(attn, lw.o)                                  # [T, H]
            if lora is not None:
                lora.apply(o, attn, i, O)
            x = x + o
            h = rms_norm(x, lw.post_norm, cfg.rms_norm_eps)
            gu = linear(h, lw.gate_up)                              # [T, 2I]
            if lora is not None:
                lora.apply(gu, h, i, GATE_UP)
            gate, up = gu.chunk(2, dim=-1)
            m = F.silu(gate) * up                                   # [T, I]
            d = linear(m, lw.down)                                  # [T, H]
            if lora is not None:
                lora.apply(d, m, i, DOWN)
            x = x + d
        x = rms_norm(x[layout.logit_rows], self.norm, cfg.rms_norm_eps)
        # on CPU, linear streams the 49152 x 576 head 2-4x faster than F.linear (see linear.py)
        return linear(x, self.lm_head).float()                      # [B, V]
