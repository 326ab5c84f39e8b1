"""EngineConfig: every knob of one engine, validated once and passed down."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str = "default"          # "default", a HF folder, a .gguf file, "random:NAME"
    device: str | None = None       # None: cuda if available, else cpu
    dtype: str | None = None        # None: bfloat16 on cuda, float32 on cpu
    max_batch: int = 32             # running requests at most
    max_tokens_per_step: int = 512  # token budget of one step (chunked prefill + decode)
    max_waiting: int = 256          # bounded queue; beyond it submit fails with QueueFullError
    max_model_len: int | None = None    # None: min(model's max positions, 8192)
    block_size: int = 16            # tokens per KV block
    num_kv_blocks: int | None = None    # None: sized from kv_cache_gb
    kv_cache_gb: float | None = None    # None: 1 GB on cpu, 90% of free memory on cuda
    max_adapters_on_gpu: int = 8    # adapter slots on the device
    max_lora_rank: int = 64
    enable_lora: bool = True        # False: no adapter slots, adapters refused (base model only)
    cuda_graphs: bool = True        # steps on CUDA replay captured graphs (decode:
                                    # engine/cuda_graphs.py, steps that prefill:
                                    # engine/mixed_graphs.py); False: every step runs eagerly
    lora_overlap: bool | None = None    # each projection site's LoRA on a second stream beside
                                    # its base projection, into a delta buffer the next op adds
                                    # (model/lora.py); None: on for CUDA (measured faster:
                                    # benchmarks/results/engine_gpu_h200_7b.json), off on CPU
    host_cache_adapters: int = 64   # parsed adapters kept in host memory
    adapter_loader_workers: int = 4     # threads that read and parse adapters in the background
    adapter_device_stacking: bool | None = None   # adapters read in the background (lazy,
                                    # or re-read after the host cache dropped them) are kept as
                                    # the file's bytes in pinned memory and stacked / checked on
                                    # the device at slot load (adapters/slots.py): the loader
                                    # threads only read. None: on for CUDA, off on CPU (there
                                    # the stacking would run on the engine's thread).
                                    # Registration still parses and checks on the host
    reserve_pinned_host_cache: bool = True  # a serving loop's start pins the host cache's
                                    # blocks for the registered adapter folders (device
                                    # stacking on CUDA only), so that cold reads reuse them
                                    # instead of pinning while the engine launches (7B, 1000
                                    # adapters, cold: 0.90x resident with, 0.86x without;
                                    # benchmarks/results/diag/engine_gpu_h200_7b_many_shadow*)
    max_adapter_bytes: int = 512 << 20
    seed: int = 0
    metrics_window: int = 4096

    def __post_init__(self):
        positive = ("max_batch", "max_tokens_per_step", "max_waiting", "block_size",
                    "max_adapters_on_gpu", "max_lora_rank", "host_cache_adapters",
                    "adapter_loader_workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose from {', '.join(_DTYPES)}")
        if self.max_lora_rank > 128:
            raise ValueError("max_lora_rank is at most 128")

    @cached_property
    def torch_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype:
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
