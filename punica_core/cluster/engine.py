"""ClusterEngine: the surface of one Engine (what LLM, AsyncEngine and the server use) over a
Router and its engine actors.

Adapters are validated here once (a host-side AdapterStore answers names/infos), and each engine
registers one from its source the first time a request that uses it lands there.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict
from types import SimpleNamespace

from ..adapters.store import AdapterInfo, AdapterStore
from ..config import EngineConfig
from ..engine.engine import Engine
from ..engine.sampling import SamplingParams
from ..engine.validation import check_request
from ..errors import AdapterInUseError, UnknownAdapterError
from .config import ClusterConfig
from .router import Router


class ClusterEngine:
    def __init__(self, config: ClusterConfig | None = None):
        self.cluster_config = config or ClusterConfig()
        self.config: EngineConfig = self.cluster_config.engine
        self.router = Router(self.cluster_config)
        info = self.router.info
        self.tokenizer = info["tokenizer"]
        self.max_model_len = info["max_model_len"]
        self.model = SimpleNamespace(cfg=info["model_cfg"], device=info["device"],
                                     dtype=info["dtype"], weight_bytes=info["weight_bytes"])
        self.store = AdapterStore(info["model_cfg"], self.config.max_lora_rank,
                                  self.config.host_cache_adapters, self.config.max_adapter_bytes)
        self.metrics = ClusterMetrics(self.router)
        self.pool = _ClusterPool(self.router, self.config.max_adapters_on_gpu)
        self.loop = _RouterLoop(self.router)
        self._name = info["name"]

    @property
    def name(self) -> str:
        return self._name

    # the prompt and chat encoders are Engine's (they need only tokenizer and model.cfg)
    encode_prompt = Engine.encode_prompt
    encode_chat = Engine.encode_chat

    # -- adapters ----------------------------------------------------------------------------
    def register_adapter(self, name: str, source, lazy: bool = False) -> AdapterInfo:
        info = self.store.register(name, source, lazy=lazy)   # validates; raises AdapterError
        self.router.add_adapter(name, source)
        return info

    def unregister_adapter(self, name: str) -> None:
        if name not in self.store:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        users = self.router.remove_adapter(name)
        if users:
            raise AdapterInUseError(f"adapter {name!r} is in use by {users} request(s); "
                                    "try again when they finish")
        self.store.unregister(name)

    def adapter_location(self, name: str) -> str:
        where = [f"engine{e['id']}:{e['device']}" for e in self.router.engine_status()
                 if e["state"] == "ready" and name in e["adapters"]]
        if where:
            return ",".join(where)
        return "host" if self.store.is_cached(name) else "disk"

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None,
                    adapter: str | None = None, *, request_id: str | None = None,
                    stream: bool = True, loop=None, enforce_queue_limit: bool = True,
                    prompt_ids: list[int] | None = None,
                    resume_output_ids: list[int] | None = None):
        """As Engine.add_request; returns the router's request (its `.stream` yields
        RequestOutputs, whichever engines it runs on)."""
        params = params or SamplingParams()
        ids = prompt_ids if prompt_ids is not None else self.encode_prompt(prompt)
        biggest = max((e.kv_total for e in self.router.engines.values() if e.kv_total), default=0)
        check_request(ids, params, adapter, self.store, self.max_model_len, biggest,
                      self.config.block_size, resume_output_ids)
        return self.router.submit(ids, params, adapter, request_id, loop, enforce_queue_limit,
                                  resume_output_ids, self.tokenizer)

    def abort(self, request_id: str) -> None:
        self.router.abort(request_id)

    def has_work(self) -> bool:
        return self.router.has_work()

    def step(self) -> list:
        """The router steps the engines; an EngineLoop wrapped around this object (e.g.
        AsyncEngine(cluster) without loop=cluster.loop) only idles here."""
        time.sleep(0.05)
        return []

    on_new_work = staticmethod(lambda: None)

    # -- introspection -----------------------------------------------------------------------
    def engines(self) -> list[dict]:
        """One row per engine: its batch (requests placed there), KV use, adapters, state."""
        return self.router.engine_status()

    def status(self) -> dict:
        rows = [e for e in self.engines() if e["state"] in ("ready", "starting")]
        r = self.router
        return {"waiting": len(r.queue) + sum(e["waiting"] for e in rows),
                "running": sum(e["running"] for e in rows),
                "kv_blocks_used": sum(e["kv_blocks_used"] for e in rows),
                "kv_blocks_total": sum(e["kv_blocks_total"] for e in rows),
                "preemptions": sum(e["preemptions"] for e in rows),
                "slots": self.pool.snapshot(), "engines": self.engines(),
                "cluster_queue": len(r.queue),
                "engines_in_use": sum(1 for e in rows if e["batch"]),
                "counters": dict(r.counters),
                "lost_engines": [ev for ev in r.events if ev["event"] == "engine_lost"]}

    def events(self) -> list[dict]:
        return list(self.router.events)

    def memory(self) -> dict:
        out: Counter = Counter({k: 0 for k in ("weights", "kv_cache", "kv_cache_used",
                                                 "adapters", "process_rss")})
        for e in list(self.router.engines.values()):
            if e.state == "ready":
                for k, v in e.snapshot.get("memory", {}).items():
                    if isinstance(v, (int, float)):
                        out[k] += v
        return dict(out, device=str(self.model.device).split(":")[0], engines=sum(
            e.state == "ready" for e in self.router.engines.values()))

    def close(self) -> None:
        self.router.close()
        self.store.close()


class ClusterMetrics:
    """EngineMetrics' read side over every engine's step records (each tagged with `engine`)."""

    def __init__(self, router: Router):
        self.router = router
        self.started = time.time()
        self._lock = threading.Lock()       # readers of EngineMetrics take it; nothing to guard

    @property
    def steps(self) -> list:
        return self.recent()

    def recent(self, n: int | None = None) -> list:
        steps = []
        for e in list(self.router.engines.values()):
            steps += list(e.steps)[-n:] if n else list(e.steps)
        steps.sort(key=lambda s: s.time)
        return steps if n is None else steps[-n:]

    def recent_dicts(self, n: int | None = None) -> list[dict]:
        return [asdict(s) for s in self.recent(n)]

    @property
    def counters(self) -> Counter:
        c = Counter(self.router.counters)
        for s in self.recent():
            c["steps"] += 1
            c["tokens_generated"] += s.tokens_sampled
            c["prefill_tokens"] += s.prefill_tokens
        return c

    @property
    def finished_by_reason(self) -> Counter:
        return Counter({k.removeprefix("finished_"): v for k, v in self.router.counters.items()
                        if k.startswith("finished_")})

    @property
    def ttft(self) -> list:
        return list(self.router.ttfts)


class _ClusterPool:
    """SlotPool.snapshot() summed over engines."""

    def __init__(self, router: Router, slots_per_engine: int):
        self.router, self.slots_per_engine = router, slots_per_engine

    def snapshot(self) -> dict:
        resident, in_use, loading = set(), Counter(), set()
        n = evictions = loads = 0
        for e in list(self.router.engines.values()):
            if e.state != "ready":
                continue
            s = e.snapshot.get("slots", {})
            n += s.get("slots", self.slots_per_engine)
            resident.update(s.get("resident", []))
            in_use.update(s.get("in_use", {}))
            loading.update(s.get("loading", []))
            evictions += s.get("evictions", 0)
            loads += s.get("loads", 0)
        return {"slots": n, "resident": sorted(resident), "in_use": dict(in_use),
                "loading": sorted(loading), "evictions": evictions, "loads": loads}

    def lookup(self, name: str):
        return None


class _RouterLoop:
    """What AsyncEngine and the server expect of an EngineLoop: the router runs itself."""

    def __init__(self, router: Router):
        self.router = router

    def start(self):
        return self

    @property
    def running(self) -> bool:
        return self.router.running

    def stop(self, timeout: float = 5.0) -> None:
        pass
