"""Data for the playground's live panels, computed from snapshots of the engine's step records.

Pure functions of the engine's read-only views (never touching the decode loop), so they are
testable without a browser. Each returns a small pandas DataFrame for one plot, or text."""
from __future__ import annotations

import time

import pandas as pd

from punica_core import Engine

MIB = 2**20
STEPS_SHOWN = 40            # batch composition: the last this-many steps
HORIZON_S = 60.0            # time plots: the last minute, one point per second


def _steps(engine: Engine, n: int = STEPS_SHOWN):
    steps = engine.metrics.recent(n)
    return steps, (steps[-1].time if steps else time.time())


# Gradio's plots take their colour domain from the data they hold when the chart is (re)built,
# and rebuild it only when a plot property such as color_map changes; a rebuild that arrives
# with new data in the same update still sees the old data. So every frame names every series,
# and the adapter plot's color_map names a new adapter only once frames have carried it for a
# moment (AdapterColors): its change then rebuilds the chart with the adapter in its legend.
PALETTE = ["#3b82f6", "#f97316", "#22c55e", "#a855f7", "#ef4444", "#14b8a6", "#eab308",
           "#ec4899", "#6366f1", "#84cc16", "#0ea5e9", "#f43f5e"]
BASE_COLOR = "#9ca3af"
PHASE_COLORS = {"prefill": "#f97316", "decode": "#3b82f6"}
QUANTILE_COLORS = {"p50": "#3b82f6", "p99": "#ef4444"}
QUEUE_COLORS = {"waiting": "#f97316", "running": "#22c55e"}
MEMORY_PARTS = ["weights", "KV used", "KV free", "LoRA slots"]     # the legend; "process" or
                                                                   # "GPU" is the other bar


class AdapterColors:
    """color_map for the adapter plot: one stable colour per adapter (in order of arrival); an
    adapter joins (or leaves) the map `settle_s` after it joined (or left) the registry."""

    def __init__(self, engine: Engine, settle_s: float = 1.5):
        self.engine, self.settle_s = engine, settle_s
        self.order = sorted(engine.store.names())
        self.first = dict.fromkeys(self.order, 0.0)
        self.last: dict[str, float] = {}

    def __call__(self) -> dict[str, str]:
        now = time.time()
        for n in sorted(self.engine.store.names()):
            if n not in self.first:
                self.first[n] = now
                self.order.append(n)
            self.last[n] = now
        shown = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(self.order)
                 if now - self.first[n] >= self.settle_s and now - self.last[n] < self.settle_s}
        return {"base": BASE_COLOR, **shown}


def batch_by_adapter(engine: Engine) -> pd.DataFrame:
    """Token rows per adapter in each of the last steps (stacked bars binned by 1 step; the
    latest step is the bin [-1, 0), hence the half steps)."""
    steps, _ = _steps(engine)
    known = ["base"] + sorted(engine.store.names())
    rows = [{"step": -0.5, "rows": 0, "adapter": a} for a in known]    # every series, always
    rows += [{"step": i - len(steps) + 0.5, "rows": n, "adapter": a}
             for i, s in enumerate(steps) for a, n in sorted(s.rows_per_adapter.items())
             if a in known]
    return pd.DataFrame(rows)


def batch_by_phase(engine: Engine) -> pd.DataFrame:
    """Prefill tokens vs decode rows in each of the last steps (stacked bars)."""
    steps, _ = _steps(engine)
    rows = [{"step": -0.5, "rows": 0, "phase": p} for p in PHASE_COLORS]
    for i, s in enumerate(steps):
        x = i - len(steps) + 0.5
        rows.append({"step": x, "rows": s.prefill_tokens, "phase": "prefill"})
        rows.append({"step": x, "rows": s.decode_rows, "phase": "decode"})
    return pd.DataFrame(rows)


def _per_second(engine: Engine, horizon_s: float = HORIZON_S):
    """Step records of the last minute grouped by whole seconds ago (0 = this second)."""
    now = time.time()
    buckets: dict[int, list] = {}
    for s in engine.metrics.recent():
        if s.time >= now - horizon_s:
            buckets.setdefault(int(now - s.time), []).append(s)
    return buckets


def latency_over_time(engine: Engine) -> pd.DataFrame:
    """Per-token latency: the duration of steps that decode (each gives every decoding request
    one token), p50 and p99 per second."""
    rows = []
    for ago, steps in sorted(_per_second(engine).items()):
        xs = sorted(s.duration_s * 1e3 for s in steps if s.decode_rows)
        if xs:
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                rows.append({"seconds ago": -ago, "ms per token":
                             round(xs[round(q * (len(xs) - 1))], 2), "quantile": name})
    return pd.DataFrame(rows or [{"seconds ago": 0, "ms per token": 0.0, "quantile": q}
                                 for q in QUANTILE_COLORS])


def throughput_over_time(engine: Engine) -> pd.DataFrame:
    """Tokens sampled per second, for each of the last 60 seconds (idle seconds are 0)."""
    buckets = _per_second(engine)
    rows = [{"seconds ago": -ago, "tokens/s": sum(s.tokens_sampled for s in buckets.get(ago, []))}
            for ago in range(int(HORIZON_S), 0, -1)]         # the current second is partial
    return pd.DataFrame(rows)


def queue_over_time(engine: Engine) -> pd.DataFrame:
    """Requests waiting and running: the most seen in each second (seconds with no step: 0)."""
    buckets = _per_second(engine)
    rows = []
    for ago in range(int(HORIZON_S), -1, -1):
        steps = buckets.get(ago, [])
        rows.append({"seconds ago": -ago, "state": "waiting",
                     "requests": max((s.queue_depth for s in steps), default=0)})
        rows.append({"seconds ago": -ago, "state": "running",
                     "requests": max((s.running for s in steps), default=0)})
    return pd.DataFrame(rows)


def tokens_per_second(engine: Engine, window_s: float = 5.0) -> float:
    now = time.time()
    steps = [s for s in engine.metrics.recent(512) if s.time >= now - window_s]
    return sum(s.tokens_sampled for s in steps) / window_s


def memory_breakdown(engine: Engine) -> pd.DataFrame:
    """Bytes the engine holds (weights / KV cache used and free / adapter slots) beside the
    whole: GPU memory allocated on a GPU ("GPU"), the process's resident memory on CPU
    ("process")."""
    m = engine.memory()
    whole = ("GPU", m["device_allocated"]) if m["device"] == "cuda" \
        else ("process", m["process_rss"])
    parts = [("engine", "weights", m["weights"]), ("engine", "KV used", m["kv_cache_used"]),
             ("engine", "KV free", m["kv_cache"] - m["kv_cache_used"]),
             ("engine", "LoRA slots", m["adapters"]), (whole[0], whole[0], whole[1])]
    return pd.DataFrame([{"memory": x, "MiB": round(b / MIB, 1), "part": p}
                         for x, p, b in parts])


def slots_table(engine: Engine) -> pd.DataFrame:
    """The adapter slots on the device: who is resident, loading, in use."""
    snap = engine.pool.snapshot()
    rows = []
    for name in snap["resident"]:
        state = "loading" if name in snap["loading"] else "resident"
        rows.append({"adapter": name, "state": state, "running": snap["in_use"].get(name, 0)})
    rows += [{"adapter": "—", "state": "free", "running": 0}] * (snap["slots"] - len(rows))
    return pd.DataFrame(rows, columns=["adapter", "state", "running"])


def status_markdown(engine: Engine) -> str:
    st = engine.status()
    slots = st["slots"]
    last = engine.metrics.recent(1)
    busy = last and last[0].time >= time.time() - 2.0
    batch = (f"{last[0].prefill_tokens} prefill + {last[0].decode_rows} decode rows "
             f"({', '.join(sorted(last[0].rows_per_adapter))})") if busy else "idle"
    return (f"**queue** {st['waiting']} waiting · **running** {st['running']} · "
            f"**batch** {batch} · **tokens/s** {tokens_per_second(engine):.1f} · "
            f"**KV blocks** {st['kv_blocks_used']}/{st['kv_blocks_total']} · "
            f"**adapter slots** {len(slots['resident'])}/{slots['slots']} resident, "
            f"{len(slots['loading'])} loading, {slots['evictions']} evicted, "
            f"{slots['loads']} loads · **preemptions** {st['preemptions']}")


def adapters_table(engine: Engine) -> pd.DataFrame:
    in_use = engine.pool.snapshot()["in_use"]
    rows = [{"name": i.name, "rank": i.rank, "targets": ", ".join(i.targets),
             "size (KiB)": round(i.nbytes / 1024, 1), "where": engine.adapter_location(i.name),
             "running requests": in_use.get(i.name, 0)} for i in engine.store.infos()]
    cols = ["name", "rank", "targets", "size (KiB)", "where", "running requests"]
    return pd.DataFrame(rows, columns=cols)
