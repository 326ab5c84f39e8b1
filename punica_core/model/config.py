"""ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face config.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

# The seven projections LoRA may target, with the fused site each one lives in.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SITE_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
           "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    model_type: str = "llama"
    name: str = "model"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a Llama-family decoder "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

    @cached_property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @cached_property
    def proj_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_size), "k_proj": (h, self.kv_size),
                "v_proj": (h, self.kv_size), "o_proj": (self.q_size, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @cached_property
    def col_offsets(self) -> dict[str, int]:
        """Column offset of each projection inside its fused site's output."""
        return {"q_proj": 0, "k_proj": self.q_size, "v_proj": self.q_size + self.kv_size,
                "o_proj": 0, "gate_proj": 0, "up_proj": self.intermediate_size, "down_proj": 0}

    def num_params(self) -> int:
        per_layer = sum(i * o for i, o in self.proj_shapes.values()) + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) \
            + self.hidden_size

    @classmethod
    def from_hf(cls, d: dict, name: str = "model") -> "ModelConfig":
        heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        if rope and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None
                                                                     else ())
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", d.get("model_type") == "qwen2"),
            bos_token_id=d.get("bos_token_id"), eos_token_ids=eos_ids,
            model_type=d.get("model_type", "llama"), name=name)


def _named(name, vocab, hidden, inter, layers, heads, kv_heads, max_pos=4096, tie=False):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=hidden // heads, max_position_embeddings=max_pos,
                       tie_word_embeddings=tie, bos_token_id=1, eos_token_ids=(2,), name=name)


# Shapes for "random:NAME" (benchmarks and tests); `tiny` shares SmolLM2's vocabulary so the
# default tokenizer works with it.
NAMED_SHAPES = {
    "tiny": _named("tiny", 49152, 64, 128, 2, 4, 2, max_pos=2048, tie=True),
    "llama-2-7b": _named("llama-2-7b", 32000, 4096, 11008, 32, 32, 32),
    "llama-2-13b": _named("llama-2-13b", 32000, 5120, 13824, 40, 40, 40),
    "llama-2-70b": _named("llama-2-70b", 32000, 8192, 28672, 80, 64, 8),
}
