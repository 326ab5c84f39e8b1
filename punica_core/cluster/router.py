"""Router: the cluster's front. Places requests on engine actors with a policy (Punica's
consolidation by default), keeps one FCFS queue for what fits nowhere, migrates requests whose
engine ran out of KV memory, re-routes the requests of an engine that died, starts engines when
all are full and releases idle ones.

Threads: callers submit and abort under the router's lock (placement is synchronous, so a
submit returns with its engine chosen); one dispatcher thread long-polls every engine actor
and turns its records into RequestOutputs on the requests' streams.

A request's stream outlives its engine: the router keeps the tokens and text it has streamed,
and a migrated or re-routed request is resubmitted with `resume_output_ids` = those tokens: the
target recomputes their KV cache in one prefill and streams only what comes after them.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter, deque
from pathlib import Path

from ..engine.request import RequestOutput
from ..engine.sampling import SamplingParams
from ..engine.stream import RequestStream
from ..errors import InvalidRequestError, QueueFullError
from .actor import EngineActor, _text_of
from .config import ClusterConfig
from .policy import EngineView, make_policy, plan_drain

log = logging.getLogger("punica.cluster")
_ids = itertools.count()
_remote_cls = None


def ensure_ray(address: str | None = None, **init_kwargs) -> bool:
    """ray.init() unless Ray is up: a local cluster, or `address` joins one. Engine actors import
    punica_core from this checkout. Returns True if this call started Ray."""
    import ray
    if ray.is_initialized():
        return False
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:           # a local cluster's workers inherit the driver's environment
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)
    kw = {"include_dashboard": False, "ignore_reinit_error": True}
    if address:
        kw["address"] = address
        kw["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    kw.update(init_kwargs)
    ray.init(**kw)
    return True


def _actor_class():
    global _remote_cls
    if _remote_cls is None:
        import ray
        _remote_cls = ray.remote(EngineActor)
    return _remote_cls


class ClusterRequest:
    """The router's record of one request: what its stream has seen, wherever it runs."""

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                 adapter: str | None, stream: RequestStream):
        self.id, self.prompt_ids, self.params, self.adapter = rid, prompt_ids, params, adapter
        self.stream = stream
        self.tokens: list[int] = []     # generated tokens streamed so far (all engines)
        self.text = ""                  # text streamed so far
        self.pending_text = ""          # text a new engine handed back, sent with the next delta
        self.engine: int | None = None  # where it runs now; None while queued
        self.seq = next(_ids)
        self.arrival = time.perf_counter()
        self.ttft: float | None = None
        self.migrations = 0
        self.engines_seen: list[int] = []

    def blocks_needed(self, block_size: int) -> int:
        return -(-(len(self.prompt_ids) + len(self.tokens) + 1) // block_size)


class EngineHandle:
    """The router's view of one engine actor."""

    def __init__(self, eid: int, handle, config):
        self.id, self.handle, self.config = eid, handle, config
        self.state = "starting"         # starting, ready, released, dead
        self.describe_ref = handle.describe.remote()
        self.poll_ref = None
        self.info: dict = {}
        self.kv_total = 0
        self.block_size = config.block_size
        self.max_batch = config.max_batch
        self.reqs: dict[str, ClusterRequest] = {}
        self.registered: set[str] = set()      # adapters registered in its store
        self.snapshot: dict = {}
        self.full = False               # ran out of KV: no new requests until one leaves
        self.draining = False
        self.taking: set[str] = set()   # ids asked back for a drain
        self.idle_since: float | None = None
        self.started_at = time.time()
        self.steps: deque = deque(maxlen=1024)

    @property
    def live(self) -> bool:
        return self.state in ("starting", "ready")

    def committed_blocks(self) -> int:
        return sum(r.blocks_needed(self.block_size) for r in self.reqs.values())

    def view(self, exclude: int | None = None) -> EngineView:
        free = self.kv_total - self.committed_blocks()
        if self.snapshot:
            free = min(free, self.kv_total - self.snapshot.get("kv_blocks_used", 0))
        held = frozenset(self.snapshot.get("slots", {}).get("resident", ())) | frozenset(
            r.adapter for r in self.reqs.values() if r.adapter)
        return EngineView(self.id, len(self.reqs), self.max_batch, free, held,
                          accepting=self.state == "ready" and not self.full
                          and not self.draining and self.id != exclude)


class Router:
    def __init__(self, config: ClusterConfig):
        import ray
        self.cfg = config
        self._owns_ray = ensure_ray(config.address)
        self.policy = make_policy(config.policy)
        self._lock = threading.RLock()
        self.engines: dict[int, EngineHandle] = {}
        self.requests: dict[str, ClusterRequest] = {}
        self.queue: deque[ClusterRequest] = deque()
        self.adapters: dict[str, object] = {}       # name -> source, registered on demand
        self.events: deque[dict] = deque(maxlen=1000)   # starts, releases, losses, drains
        self.counters: Counter = Counter()
        self.ttfts: deque[float] = deque(maxlen=4096)   # time to first token, all engines
        self.max_waiting = config.max_waiting or config.engine.max_waiting
        self._next_engine = 0
        self._start_failures = 0
        self._last_drain = 0.0
        self._stop = threading.Event()
        with self._lock:
            for _ in range(config.start_engines):
                self._start_engine()
        first = list(self.engines.values())
        try:
            infos = ray.get([e.describe_ref for e in first])
        except Exception:
            self._kill_all()
            raise
        with self._lock:
            for e, info in zip(first, infos):
                self._ready(e, info)
        self.info = infos[0]
        self._thread = threading.Thread(target=self._run, name="punica-router", daemon=True)
        self._thread.start()

    # -- engines -----------------------------------------------------------------------------
    def _start_engine(self) -> EngineHandle:
        import ray
        eid = self._next_engine
        self._next_engine += 1
        ecfg = self.cfg.engine_config(eid)
        dev = ecfg.device or ""
        gpu = dev.startswith("cuda") or (not dev and ray.cluster_resources().get("GPU", 0) >= 1)
        opts = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": self.cfg.num_cpus_per_engine}
        threads = self.cfg.torch_threads or (None if gpu else max(
            1, int(self.cfg.num_cpus_per_engine)))
        handle = _actor_class().options(max_restarts=0, **opts).remote(
            eid, ecfg, threads, self.cfg.migrate_on_preempt)
        e = EngineHandle(eid, handle, ecfg)
        self.engines[eid] = e
        self._event("engine_starting", e, gpu=gpu)
        return e

    def _ready(self, e: EngineHandle, info: dict) -> None:
        e.info, e.state = info, "ready"
        e.kv_total, e.block_size, e.max_batch = (info["kv_blocks_total"], info["block_size"],
                                                 info["max_batch"])
        e.idle_since = time.time()
        self._start_failures = 0
        self._event("engine_ready", e, device=info["device"],
                    seconds=round(time.time() - e.started_at, 2))
        self._drain_queue()

    def _release(self, e: EngineHandle) -> None:
        import ray
        e.state = "released"
        self._event("engine_released", e)
        try:
            ray.kill(e.handle, no_restart=True)
        except Exception:  # noqa: BLE001
            pass

    def _lost(self, e: EngineHandle, error: BaseException) -> None:
        """An engine actor died: report it, re-route its requests (they resume elsewhere)."""
        import ray
        if not e.live:
            return
        was_starting = e.state == "starting"
        e.state = "dead"
        reqs = sorted(e.reqs.values(), key=lambda r: r.seq)
        e.reqs.clear()
        self.counters["engines_lost"] += 1
        self._event("engine_lost", e, error=f"{type(error).__name__}: {str(error)[:300]}",
                    requests=[r.id for r in reqs])
        log.warning("engine %d lost (%s); re-routing %d request(s)", e.id,
                    type(error).__name__, len(reqs))
        try:
            ray.kill(e.handle, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        for r in reversed(reqs):            # they were running: ahead of the queue, in order
            r.engine = None
            self.counters["rerouted"] += 1
            self.queue.appendleft(r)
        if was_starting:
            self._start_failures += 1
        if not any(x.state == "ready" for x in self.engines.values()) and \
                self._start_failures >= 3:
            for r in list(self.queue):
                self._fail(r, f"no engine could be started: {error}")
            return
        self._drain_queue()
        self._maybe_scale_up()

    def _maybe_scale_up(self) -> None:
        if not self.queue or any(e.state == "starting" for e in self.engines.values()):
            return
        if sum(e.live for e in self.engines.values()) < self.cfg.max_engines:
            self._start_engine()

    # -- placement ---------------------------------------------------------------------------
    def _views(self, exclude: int | None = None) -> list[EngineView]:
        return [e.view(exclude) for e in self.engines.values() if e.state == "ready"]

    def _choose(self, r: ClusterRequest, exclude: int | None = None) -> EngineHandle | None:
        ready = [e for e in self.engines.values() if e.state == "ready"]
        if not ready:
            return None
        need = r.blocks_needed(ready[0].block_size)
        eid = self.policy.choose([e.view(exclude) for e in ready], need, r.adapter)
        return None if eid is None else self.engines[eid]

    def _place(self, r: ClusterRequest, exclude: int | None = None, front: bool = False) -> None:
        e = None if (self.queue and not front) else self._choose(r, exclude)
        if e is None:
            (self.queue.appendleft if front else self.queue.append)(r)
            self._maybe_scale_up()
        else:
            self._send(e, r)

    def _drain_queue(self) -> None:
        while self.queue:
            e = self._choose(self.queue[0])
            if e is None:
                return
            self._send(e, self.queue.popleft())

    def _send(self, e: EngineHandle, r: ClusterRequest) -> None:
        spec = {"request_id": r.id, "prompt_ids": r.prompt_ids, "params": r.params,
                "adapter": r.adapter, "resume_output_ids": list(r.tokens) or None,
                "text_len": len(r.text) + len(r.pending_text)}
        if r.adapter is not None and r.adapter not in e.registered:
            spec["adapter_source"] = self.adapters.get(r.adapter)
            e.registered.add(r.adapter)
        e.reqs[r.id] = r
        e.idle_since = None
        r.engine = e.id
        r.engines_seen.append(e.id)
        e.handle.submit.remote(spec)

    # -- requests ----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
               request_id: str | None = None, loop=None, enforce_queue_limit: bool = True,
               resume_output_ids: list[int] | None = None, tokenizer=None) -> ClusterRequest:
        rid = request_id or f"creq-{next(_ids)}"
        r = ClusterRequest(rid, list(prompt_ids), params, adapter,
                           RequestStream(rid, self.abort, loop))
        if resume_output_ids:
            r.tokens = list(resume_output_ids)
            r.text = _text_of(tokenizer, params.stop, r.tokens) if tokenizer else ""
        with self._lock:
            if self._stop.is_set():
                raise InvalidRequestError("the cluster is shut down")
            if rid in self.requests:
                raise InvalidRequestError(f"request id {rid!r} is already in use")
            if enforce_queue_limit and len(self.queue) >= self.max_waiting:
                self.counters["rejected_queue_full"] += 1
                raise QueueFullError(f"server busy: {len(self.queue)} requests already waiting "
                                     f"(limit {self.max_waiting}); retry later")
            self.requests[rid] = r
            self.counters["requests"] += 1
            self._place(r)
        return r

    def abort(self, request_id: str) -> None:
        with self._lock:
            r = self.requests.get(request_id)
            if r is None:
                return
            e = self.engines.get(r.engine) if r.engine is not None else None
            self._retire(r)
            if e is not None and e.live:
                e.handle.abort.remote(request_id)
        r.stream.put(RequestOutput(r.id, r.adapter, r.text, list(r.tokens), "", [], True,
                                   "abort", None, len(r.prompt_ids), r.ttft))

    def _retire(self, r: ClusterRequest) -> None:
        self.requests.pop(r.id, None)
        if r.engine is None:
            try:
                self.queue.remove(r)
            except ValueError:
                pass
            return
        e = self.engines[r.engine]
        r.engine = None
        e.reqs.pop(r.id, None)
        e.full = False
        if not e.reqs:
            e.idle_since = time.time()
            e.draining = False
        self._drain_queue()

    def _fail(self, r: ClusterRequest, why: str) -> None:
        self._retire(r)
        r.stream.put(RequestOutput(r.id, r.adapter, r.text, list(r.tokens), r.pending_text, [],
                                   True, "error", why, len(r.prompt_ids), r.ttft))

    # -- the dispatcher ----------------------------------------------------------------------
    def _apply(self, e: EngineHandle, records: list[tuple], snap: dict) -> None:
        e.snapshot = snap
        if snap.get("steps"):
            e.steps.extend(snap["steps"])
        for rec in records:
            r = self.requests.get(rec[1])
            if r is None or r.engine != e.id:
                continue                    # aborted, or it moved on: stale
            if rec[0] == "migrate":
                self._migrate(e, r, rec[2])
                continue
            _, _, new, delta, finished, reason, error, _ = rec
            if not new and not finished:
                r.pending_text += delta     # text a new engine handed back after a move
                continue
            if new and r.ttft is None:
                r.ttft = time.perf_counter() - r.arrival
                self.ttfts.append(r.ttft)
            r.tokens.extend(new)
            delta, r.pending_text = r.pending_text + delta, ""
            r.text += delta
            out = RequestOutput(r.id, r.adapter, r.text, list(r.tokens), delta, list(new),
                                finished, reason, error, len(r.prompt_ids), r.ttft)
            if finished:
                self.counters["finished_" + str(reason)] += 1
                self._retire(r)
            r.stream.put(out)

    def _migrate(self, e: EngineHandle, r: ClusterRequest, output_ids: list[int]) -> None:
        if output_ids != r.tokens:      # cannot happen while records arrive in order
            log.error("request %s: engine %d gave back %d tokens, the stream saw %d", r.id,
                      e.id, len(output_ids), len(r.tokens))
        drained = r.id in e.taking
        e.taking.discard(r.id)
        e.reqs.pop(r.id, None)
        if not drained:
            e.full = True               # out of KV memory: nothing new until one leaves
        if not e.reqs:
            e.idle_since, e.draining = time.time(), False
        r.engine = None
        r.migrations += 1
        self.counters["migrations_drain" if drained else "migrations_kv"] += 1
        self._event("migrate", e, request=r.id, tokens=len(r.tokens),
                    reason="drain" if drained else "kv_full")
        self._place(r, exclude=e.id, front=True)

    def _run(self) -> None:
        import ray
        last_house = 0.0
        while not self._stop.is_set():
            refs: dict = {}
            with self._lock:
                for e in self.engines.values():
                    if e.state == "starting":
                        refs[e.describe_ref] = (e, "describe")
                    elif e.state == "ready":
                        if e.poll_ref is None:
                            e.poll_ref = e.handle.poll.remote(self.cfg.poll_timeout_s)
                        refs[e.poll_ref] = (e, "poll")
            if refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.1)
                if ready and len(refs) > 1:
                    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            else:
                ready = []
                time.sleep(0.05)
            for ref in ready:
                e, kind = refs[ref]
                try:
                    result = ray.get(ref)
                except Exception as ex:  # noqa: BLE001 - RayActorError and friends: it is gone
                    with self._lock:
                        e.poll_ref = None
                        self._lost(e, ex)
                    continue
                with self._lock:
                    if kind == "describe":
                        if e.state == "starting":
                            self._ready(e, result)
                    else:
                        e.poll_ref = None
                        if e.state == "ready":
                            self._apply(e, *result)
            now = time.time()
            if now - last_house > 0.2:
                last_house = now
                with self._lock:
                    self._housekeeping(now)

    def _housekeeping(self, now: float) -> None:
        self._drain_queue()
        self._maybe_scale_up()
        ready = sorted((e for e in self.engines.values() if e.state == "ready"),
                       key=lambda e: -e.id)
        if self.cfg.idle_release_s is not None and not self.queue:
            n = len(ready)
            for e in ready:
                if n > self.cfg.min_engines and not e.reqs and e.idle_since is not None \
                        and now - e.idle_since >= self.cfg.idle_release_s:
                    self._release(e)
                    n -= 1
        if self.cfg.drain and now - self._last_drain > 1.0 and not self.queue:
            views = self._views()
            needs = {e.id: [r.blocks_needed(e.block_size) for r in e.reqs.values()]
                     for e in self.engines.values() if e.state == "ready"}
            src = plan_drain(views, needs, self.cfg.drain_below)
            if src is not None:
                self._last_drain = now
                e = self.engines[src]
                e.draining, e.taking = True, set(e.reqs)
                self._event("drain", e, requests=sorted(e.taking))
                e.handle.take.remote(sorted(e.taking))

    def _event(self, kind: str, e: EngineHandle, **kw) -> None:
        self.events.append({"time": time.time(), "event": kind, "engine": e.id, **kw})

    # -- adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, source) -> None:
        with self._lock:
            self.adapters[name] = source

    def remove_adapter(self, name: str) -> int:
        """Forgets an adapter everywhere; returns how many requests still use it (then nothing
        is removed)."""
        with self._lock:
            users = sum(1 for r in self.requests.values() if r.adapter == name)
            if users:
                return users
            self.adapters.pop(name, None)
            for e in self.engines.values():
                if name in e.registered and e.live:
                    e.registered.discard(name)
                    e.handle.unregister_adapter.remote(name)
            return 0

    # -- introspection -----------------------------------------------------------------------
    def engine_status(self) -> list[dict]:
        with self._lock:
            out = []
            for e in sorted(self.engines.values(), key=lambda e: e.id):
                s = e.snapshot
                out.append({"id": e.id, "state": e.state, "batch": len(e.reqs),
                            "running": s.get("running", 0), "waiting": s.get("waiting", 0),
                            "kv_blocks_used": s.get("kv_blocks_used", 0),
                            "kv_blocks_total": e.kv_total, "max_batch": e.max_batch,
                            "preemptions": s.get("preemptions", 0),
                            "migrations_out": s.get("migrations_out", 0),
                            "adapters": sorted(s.get("slots", {}).get("resident", [])),
                            "full": e.full, "draining": e.draining,
                            "device": e.info.get("device"), "node": e.info.get("node")})
            return out

    def has_work(self) -> bool:
        return bool(self.requests)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def _kill_all(self) -> None:
        import ray
        for e in self.engines.values():
            if e.live:
                e.state = "released"
                try:
                    ray.kill(e.handle, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass

    def close(self) -> None:
        import ray
        self._stop.set()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(5)
        with self._lock:
            self._kill_all()
            for r in list(self.requests.values()):
                self._fail(r, "the cluster was shut down")
        if self._owns_ray:
            ray.shutdown()
