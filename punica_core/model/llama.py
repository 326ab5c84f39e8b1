"""A Llama-family decoder written for batches of token rows from many requests.

Fused qkv and gate_up projections; LoRA deltas on all seven projections via LoraContext;
paged KV cache. RMSNorm, RoPE, grouped-query attention, SwiGLU as in Hugging Face's Llama.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.layout import BatchLayout
from .attention import paged_attention_ref
from .config import ModelConfig
from .fused_triton import fused_ops
from .fused_triton import rms_norm_torch as rms_norm  # noqa: F401 - the reference, by name
from .kv_cache import KVCache
from .linear import linear
from .lora import LoraContext
from .rope import RotaryTable

# Eager steps on CUDA in fp16/bf16 (those that also prefill, as in continuous batching, or that
# no CUDA graph fits) run their decode rows' attention in the paged Triton kernel, not a gather
# + SDPA over padded contexts (benchmarks/diag/mixed_steps.py). Tests switch it off for the
# reference.
MIXED_STEP_PAGED_DECODE = True
# ... and their prefill chunks' attention in the paged Triton prefill kernel, one launch for
# all chunks (graph-capturable) instead of a gather + SDPA per chunk: 4-29x faster per 7B layer
# from 4 chunks up (benchmarks/results/diag/prefill_attention_h200_7b.json; one lone 2048-row
# chunk is 1.6x slower than SDPA, ~4 ms of a ~150 ms step). The engine asks build_layout for
# the chunks' tables when it is on (paged_prefill).
MIXED_STEP_PAGED_PREFILL = True

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
        if layout.prefill_tables is not None:
            return self._paged_step(q, kv, layer, layout)
        return paged_attention_ref(q, kv.k[layer], kv.v[layer], layout, self.scale,
                                   self._paged_decode(q, kv, layer, layout))

    def uses_paged_prefill(self) -> bool:
        """Whether eager steps want the prefill chunks' tables (build_layout's paged_prefill):
        MIXED_STEP_PAGED_PREFILL on CUDA in fp16/bf16 with triton."""
        if not MIXED_STEP_PAGED_PREFILL or self.device.type != "cuda" \
                or self.dtype == torch.float32:
            return False
        from .attention_triton import triton_available
        return triton_available()

    def _paged_step(self, q, kv: KVCache, layer: int, layout: BatchLayout) -> torch.Tensor:
        """Every row's attention from the paged kernels: the prefill chunks in one launch,
        the decode rows in the paged decode kernel."""
        from .attention_prefill_triton import paged_prefill_attention
        pt = layout.prefill_tables
        out = paged_prefill_attention(q, kv.k[layer], kv.v[layer], pt.starts, pt.lens,
                                      pt.first_pos, pt.block_tables, kv.block_size, self.scale,
                                      max_chunk_rows=pt.max_rows)
        if layout.decode_rows.numel():
            rows = layout.decode_rows
            out[rows] = self._decode_kernel(kv, layer, layout)(q[rows])
        return out

    def _paged_decode(self, q, kv: KVCache, layer: int, layout: BatchLayout):
        """For an eager step on CUDA in fp16/bf16 (fp32 keeps the reference): its decode rows'
        attention as the paged Triton kernel on their block tables; else None."""
        if layout.decode_block_tables is None or not MIXED_STEP_PAGED_DECODE \
                or q.dtype == torch.float32:
            return None
        from .attention_triton import triton_available
        return self._decode_kernel(kv, layer, layout) if triton_available() else None

    def _decode_kernel(self, kv: KVCache, layer: int, layout: BatchLayout):
        """The decode rows' attention ([Bd, heads, D] -> same) by the paged Triton kernel on
        the layout's decode block tables."""
        from .attention_triton import paged_decode_attention
        return lambda qd: paged_decode_attention(qd, kv.k[layer], kv.v[layer],
                                                 layout.decode_block_tables,
                                                 layout.decode_context_lens, kv.block_size,
                                                 self.scale)

    @staticmethod
    def _project(x, weight, bias, lora: LoraContext | None, layer: int, site
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A projection site (fused q/k/v, o, gate/up, down) with every row's LoRA delta:
        (y, None) with the delta added in place, or (y, delta) for the consumer to add."""
        if lora is None:
            return linear(x, weight, bias), None
        pending = lora.start(x, layer, site, weight.shape[0])    # beside the base projection
        with lora.base_projection(site, pending):
            y = linear(x, weight, bias)
        return y, lora.finish(y, x, layer, site, pending)

    @torch.inference_mode()
    def forward(self, layout: BatchLayout, kv: KVCache, lora: LoraContext | None) -> torch.Tensor:
        """Runs every row of the step; returns float32 logits of layout.logit_rows: [B, V]."""
        cfg = self.cfg
        T = layout.num_rows
        eps = cfg.rms_norm_eps
        ops = fused_ops(self.device)        # Triton kernels on CUDA, else the torch reference
        x = self.embed[layout.input_ids]                            # [T, H], updated in place
        cos, sin = self.rope.lookup(layout.positions)               # [T, D/2]
        h = ops.rms_norm(x, self.layers[0].input_norm, eps)         # [T, H]
        for i, lw in enumerate(self.layers):
            # each *_d is the site's LoRA delta when computed beside its projection (else None:
            # already added); the next op adds it on the fly
            qkv, qkv_d = self._project(h, lw.qkv, lw.qkv_bias, lora, i, QKV)   # [T, q + 2kv]
            # rotary on q and k, and k, v written into this layer's paged cache
            q = ops.rotary_qk_and_cache(qkv, cos, sin, kv.k[i], kv.v[i], layout.slot_mapping,
                                        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                        lora_delta=qkv_d)
            attn = self._attention(q, kv, i, layout).reshape(T, cfg.q_size)
            o, o_d = self._project(attn, lw.o, None, lora, i, O)    # [T, H]
            h, x = ops.add_rms_norm(x, o, lw.post_norm, eps, inplace=True,
                                    lora_delta=o_d)                 # x += o
            gu, gu_d = self._project(h, lw.gate_up, None, lora, i, GATE_UP)   # [T, 2I]
            m = ops.silu_mul(gu, lora_delta=gu_d)                   # [T, I]
            d, d_d = self._project(m, lw.down, None, lora, i, DOWN)     # [T, H]
            # the residual add fused with the next layer's input norm (the final norm at last)
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, x = ops.add_rms_norm(x, d, nxt, eps, inplace=True, lora_delta=d_d)  # x += d
        # on CPU, linear streams the 49152 x 576 head 2-4x faster than F.linear (see linear.py)
        return linear(h[layout.logit_rows], self.lm_head).float()   # [B, V]
