"""Real PEFT adapters with random weights, for tests and benchmarks."""
from __future__ import annotations

import json
from pathlib import Path

import torch

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(hf_model, out_dir, rank: int, targets, rslora: bool = False,
                      seed: int = 0, b_scale: float = 0.05, alpha: float | None = None,
                      **extra) -> Path:
    """Saves a PEFT LoRA adapter for `hf_model`, made by peft itself, with random A and B
    (B scaled so outputs change but stay sensible). `hf_model` is left as it was."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets),
                     use_rslora=rslora, init_lora_weights=False, **extra)
    peft_model = get_peft_model(hf_model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_scale)
            elif "lora_A" in name:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    peft_model.save_pretrained(str(out_dir))
    peft_model.unload()     # restores hf_model's modules for the next adapter
    return Path(out_dir)


def write_random_adapter(model_cfg, out_dir, rank: int, targets=ALL_PROJECTIONS, seed: int = 0,
                         b_scale: float = 0.05, dtype=torch.bfloat16) -> Path:
    """Writes a PEFT-format adapter folder for any ModelConfig without building the model
    (fast, for 7B-sized benchmarks): the same files peft would save."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model_cfg.num_layers):
        for proj in targets:
            fin, fout = model_cfg.proj_shapes[proj]
            kind = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{kind}.{proj}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fin, generator=g)
                                               / fin ** 0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fout, rank, generator=g)
                                               * b_scale).to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": model_cfg.name,
        "task_type": "CAUSAL_LM"}))
    return out
