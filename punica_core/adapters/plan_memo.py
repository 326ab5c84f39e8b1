"""A bounded memo of checked adapter plans, keyed by what the check reads: the safetensors
header's bytes (by digest), the file's size, the config's scaling settings and the base
model's shapes. The check is a pure function of those, so an adapter with the same key needs
no second check; names, folders and the rest of the config are set per adapter by the caller.
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections import OrderedDict

from ..model.config import ModelConfig

# the config keys the plan's ranks and scales come from (peft._check_plan)
SCALING_KEYS = ("lora_alpha", "r", "use_rslora", "alpha_pattern", "rank_pattern")


class PlanMemo:
    def __init__(self, size: int = 64):
        self.size = size
        self._plans: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()       # loader threads plan in parallel
        self.hits = 0

    @staticmethod
    def key(head: bytes | memoryview, file_len: int | None, cfg: dict,
            model_cfg: ModelConfig, max_rank: int) -> tuple | None:
        """None when head holds no whole header (the check then says what is wrong)."""
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", bytes(head[:8]))
        if 8 + n > len(head):
            return None
        # hashlib releases the GIL on buffers this size, unlike the Python check it replaces
        digest = hashlib.blake2b(memoryview(head)[8:8 + n], digest_size=16).digest()
        scaling = json.dumps([cfg.get(k) for k in SCALING_KEYS], sort_keys=True, default=repr)
        return (digest, len(head) if file_len is None else file_len, scaling, max_rank,
                model_cfg.num_layers, tuple(sorted(model_cfg.proj_shapes.items())))

    def get(self, key: tuple | None):
        if key is None:
            return None
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self.hits += 1
            return plan

    def put(self, key: tuple | None, plan) -> None:
        if key is None:
            return
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.size:
                self._plans.popitem(last=False)
