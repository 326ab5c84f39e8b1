"""Real PEFT adapters with random weights, for tests and benchmarks (made with peft itself)."""
from __future__ import annotations

from pathlib import Path

import torch

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(hf_model, out_dir, rank: int, targets, rslora: bool = False,
                      seed: int = 0, b_scale: float = 0.05, alpha: float | None = None,
                      **extra) -> Path:
    """Saves a PEFT LoRA adapter for `hf_model` with random A and B (B scaled so outputs change
    but stay sensible). `hf_model` is left as it was. Returns the folder."""
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
