"""Paged KV cache: fixed-size blocks in one preallocated tensor, and an exact block allocator."""
from __future__ import annotations

import torch

from .config import ModelConfig


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    """Hands out block ids; `num_free + num_used == num_blocks` always holds."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() gives low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"KV block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)


class KVCache:
    """K and V for every layer: [layers, num_blocks * block_size, kv_heads, head_dim].

    A token at logical position p of a request lives at flat index
    block_table[p // block_size] * block_size + p % block_size. One extra block past the
    allocator's is scratch: padding rows of a CUDA-graph batch write their K/V there.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device):
        shape = (cfg.num_layers, (num_blocks + 1) * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.scratch_slot = num_blocks * block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype) -> int:
        return 2 * cfg.num_layers * cfg.kv_size * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [T, kv_heads, head_dim] stored at flat indices slot_mapping [T]."""
        self.k[layer].index_copy_(0, slot_mapping, k)
        self.v[layer].index_copy_(0, slot_mapping, v)
