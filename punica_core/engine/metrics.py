"""Step metrics: a ring buffer of step records plus running counters. Panels and /metrics read
snapshots; the engine thread is the only writer."""
from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field


@dataclass
class StepRecord:
    time: float                     # wall clock at the end of the step
    duration_s: float
    num_rows: int                   # token rows in the batch
    prefill_tokens: int
    decode_rows: int
    num_requests: int
    rows_per_adapter: dict[str, int] = field(default_factory=dict)   # "base" for no adapter
    queue_depth: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    slots_used: int = 0
    tokens_sampled: int = 0

    @property
    def num_adapters(self) -> int:
        return sum(1 for a in self.rows_per_adapter if a != "base")


def process_memory_bytes() -> int:
    try:
        import psutil
        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class EngineMetrics:
    def __init__(self, window: int = 4096):
        self.steps: deque[StepRecord] = deque(maxlen=window)
        self.counters: Counter = Counter()
        self.ttft: deque[float] = deque(maxlen=window)
        self.finished_by_reason: Counter = Counter()
        self.started = time.time()
        self._lock = threading.Lock()

    def record_step(self, rec: StepRecord) -> None:
        with self._lock:
            self.steps.append(rec)
            self.counters["steps"] += 1
            self.counters["tokens_generated"] += rec.tokens_sampled
            self.counters["prefill_tokens"] += rec.prefill_tokens

    def record_finish(self, reason: str, ttft: float | None) -> None:
        with self._lock:
            self.finished_by_reason[reason] += 1
            if ttft is not None:
                self.ttft.append(ttft)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def recent(self, n: int | None = None) -> list[StepRecord]:
        with self._lock:
            steps = list(self.steps)
        return steps if n is None else steps[-n:]

    def recent_dicts(self, n: int | None = None) -> list[dict]:
        return [asdict(s) for s in self.recent(n)]
