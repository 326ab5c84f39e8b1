"""Data for the playground's live panels, computed from the engine's step records.

Pure functions over snapshots, so they are testable without a browser."""
from __future__ import annotations

import time

import pandas as pd

from punica_core import Engine

MIB = 2**20


def batch_composition(engine: Engine, window_s: float = 2.0) -> pd.DataFrame:
    """Token rows per adapter in the last few steps, split into prefill and decode."""
    steps = [s for s in engine.metrics.recent(64) if s.time >= time.time() - window_s]
    rows = []
    if steps:
        last = steps[-1]
        for adapter, n in sorted(last.rows_per_adapter.items()):
            rows.append({"adapter": adapter, "rows": n, "kind": "rows in last step"})
    if not rows:
        rows = [{"adapter": "(idle)", "rows": 0, "kind": "rows in last step"}]
    return pd.DataFrame(rows)


def latency_over_time(engine: Engine, bucket_s: float = 1.0, horizon_s: float = 60.0
                      ) -> pd.DataFrame:
    """Per-token latency (decode step time) p50 and p99 per second, over the last minute."""
    now = time.time()
    steps = [s for s in engine.metrics.recent() if s.decode_rows and s.time >= now - horizon_s]
    buckets: dict[int, list[float]] = {}
    for s in steps:
        buckets.setdefault(int((s.time - now) // bucket_s), []).append(s.duration_s * 1e3)
    rows = []
    for b, xs in sorted(buckets.items()):
        xs.sort()
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            rows.append({"seconds ago": -b * bucket_s, "ms per token": xs[int(q * (len(xs) - 1))],
                         "quantile": name})
    if not rows:
        rows = [{"seconds ago": 0.0, "ms per token": 0.0, "quantile": "p50"}]
    return pd.DataFrame(rows)


def tokens_per_second(engine: Engine, window_s: float = 5.0) -> float:
    now = time.time()
    steps = [s for s in engine.metrics.recent(512) if s.time >= now - window_s]
    return sum(s.tokens_sampled for s in steps) / window_s


def memory_breakdown(engine: Engine) -> pd.DataFrame:
    m = engine.memory()
    rows = [{"part": "weights", "MiB": m["weights"] / MIB},
            {"part": "KV used", "MiB": m["kv_cache_used"] / MIB},
            {"part": "KV free", "MiB": (m["kv_cache"] - m["kv_cache_used"]) / MIB},
            {"part": "adapters", "MiB": m["adapters"] / MIB}]
    if m["device"] == "cuda":
        rows.append({"part": "GPU total", "MiB": m["device_allocated"] / MIB})
    else:
        rows.append({"part": "process", "MiB": m["process_rss"] / MIB})
    return pd.DataFrame(rows)


def status_markdown(engine: Engine) -> str:
    st = engine.status()
    slots = st["slots"]
    return (f"**queue** {st['waiting']} waiting · **running** {st['running']} · "
            f"**tokens/s** {tokens_per_second(engine):.1f} · "
            f"**KV blocks** {st['kv_blocks_used']}/{st['kv_blocks_total']} · "
            f"**adapter slots** {len(slots['resident'])}/{slots['slots']} resident, "
            f"{len(slots['loading'])} loading, {slots['evictions']} evicted · "
            f"**preemptions** {st['preemptions']}")


def adapters_table(engine: Engine) -> pd.DataFrame:
    in_use = engine.pool.snapshot()["in_use"]
    rows = [{"name": i.name, "rank": i.rank, "targets": ", ".join(i.targets),
             "size (KiB)": round(i.nbytes / 1024, 1), "where": engine.adapter_location(i.name),
             "running requests": in_use.get(i.name, 0)} for i in engine.store.infos()]
    cols = ["name", "rank", "targets", "size (KiB)", "where", "running requests"]
    return pd.DataFrame(rows, columns=cols)
