"""GET /metrics: the engine's counters, gauges and histograms in Prometheus' text format.

Nothing hooks the engine loop. At each scrape, `EngineExporter.collect()` reads the engine's
metrics: counters and gauges are read as they are now; the histograms (step latency, batch
size, adapters per step, time to first token) are fed with the step records and TTFTs that
arrived since the previous scrape. New entries are found by object identity in the engine's
ring buffers, so none is counted twice; if more than the buffer's window (4096 steps by
default) arrive between two scrapes, the oldest of them are not observed.

Each app has its own CollectorRegistry, so several servers can live in one process.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from punica_core import Engine

STEP_SECONDS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
TTFT_SECONDS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ADAPTER_COUNTS = (0, 1, 2, 4, 8, 16, 32, 64)


def _new_since(items: list, last):
    """The items after `last` (by identity); all of them when `last` has left the buffer."""
    for i in range(len(items) - 1, -1, -1):
        if items[i] is last:
            return items[i + 1:]
    return items


class EngineExporter(Collector):
    def __init__(self, engine: Engine, registry: CollectorRegistry, prefix: str = "punica"):
        self.engine, self.p = engine, prefix
        self._lock = threading.Lock()
        self._last_step = self._last_ttft = None
        # registered before the histograms: the registry collects in registration order, so
        # each scrape feeds the histograms (in collect()) before they are read
        registry.register(self)
        h = dict(registry=registry)
        self.step_seconds = Histogram(f"{prefix}_step_duration_seconds",
                                      "Wall time of one engine step (forward + sampling)",
                                      buckets=STEP_SECONDS, **h)
        self.batch_requests = Histogram(f"{prefix}_step_batch_requests",
                                        "Requests in one step's batch", buckets=BATCH_SIZES, **h)
        self.batch_rows = Histogram(f"{prefix}_step_batch_tokens",
                                    "Token rows in one step (prefill tokens + decode rows)",
                                    buckets=BATCH_SIZES + (512, 1024, 2048), **h)
        self.step_adapters = Histogram(f"{prefix}_step_adapters",
                                       "Distinct adapters in one step's batch",
                                       buckets=ADAPTER_COUNTS, **h)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds",
                              "From arrival in the engine to the first generated token",
                              buckets=TTFT_SECONDS, **h)

    def _observe_new(self) -> None:
        m = self.engine.metrics
        with m._lock:                        # the engine thread appends under this lock
            steps, ttfts = list(m.steps), list(m.ttft)
        with self._lock:
            new_steps = _new_since(steps, self._last_step)
            new_ttfts = _new_since(ttfts, self._last_ttft)
            if steps:
                self._last_step = steps[-1]
            if ttfts:
                self._last_ttft = ttfts[-1]
            for s in new_steps:
                self.step_seconds.observe(s.duration_s)
                self.batch_requests.observe(s.num_requests)
                self.batch_rows.observe(s.num_rows)
                self.step_adapters.observe(s.num_adapters)
            for t in new_ttfts:
                self.ttft.observe(t)

    def describe(self):
        return []       # collected at scrape time only

    def collect(self):
        self._observe_new()
        e, p = self.engine, self.p
        m = e.metrics
        with m._lock:
            counters, finished = dict(m.counters), dict(m.finished_by_reason)
        status = e.status()

        def counter(name, doc, value, labels=None):
            c = CounterMetricFamily(f"{p}_{name}", doc, labels=list(labels or {}))
            c.add_metric(list((labels or {}).values()), value)
            return c

        def gauge(name, doc, value):
            return GaugeMetricFamily(f"{p}_{name}", doc, value=value)

        yield counter("requests", "Requests accepted by the engine", counters.get("requests", 0))
        fin = CounterMetricFamily(f"{p}_requests_finished", "Finished requests by reason",
                                  labels=["reason"])
        for reason in ("stop", "length", "abort", "error"):
            fin.add_metric([reason], finished.get(reason, 0))
        yield fin
        yield counter("requests_rejected", "Requests refused because the queue was full",
                      counters.get("rejected_queue_full", 0))
        yield counter("generated_tokens", "Tokens sampled", counters.get("tokens_generated", 0))
        yield counter("prefill_tokens", "Prompt tokens computed (recomputation included)",
                      counters.get("prefill_tokens", 0))
        yield counter("steps", "Engine steps that ran a batch", counters.get("steps", 0))
        yield counter("idle_waiting_seconds", "Seconds with requests queued and none runnable "
                      "(their adapters loading, no free slot or KV memory)",
                      counters.get("idle_waiting_s", 0))

        slots = status["slots"]
        yield gauge("queue_depth", "Requests waiting to be scheduled", status["waiting"])
        yield gauge("running_requests", "Requests in the running batch", status["running"])
        yield gauge("kv_blocks_used", "KV-cache blocks in use", status["kv_blocks_used"])
        yield gauge("kv_blocks_total", "KV-cache blocks in all", status["kv_blocks_total"])
        yield gauge("adapter_slots_used", "Device adapter slots holding an adapter",
                    len(slots.get("resident", ())))
        yield gauge("adapter_slots_in_use", "Adapter slots pinned by running requests",
                    len(slots.get("in_use", {})))
        yield gauge("adapter_slots_total", "Device adapter slots", slots.get("slots", 0))
        yield gauge("adapters_registered", "Adapters known to the server",
                    len(e.store.names()))
        yield counter("preemptions", "Requests preempted because the KV cache was full",
                      status.get("preemptions", 0))
        yield counter("adapter_loads", "Adapter copies into a device slot", slots.get("loads", 0))
        yield counter("adapter_evictions", "Adapters evicted from a device slot",
                      slots.get("evictions", 0))


def make_registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    EngineExporter(engine, registry)
    return registry
