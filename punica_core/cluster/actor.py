"""EngineActor: one Engine (one GPU) inside a Ray actor, with its own step loop.

The actor is asynchronous: its methods run in order on its event loop, while the engine steps
on a background thread. Outputs are compact records batched per step; the router long-polls
them with `poll()` (one call returns every record since the last one, plus a status
snapshot), so the per-token cost is one tuple, not one Ray call.

Records, in the order they happened:
  ("out", id, new_token_ids, delta, finished, finish_reason, error, ttft)
  ("migrate", id, output_ids)     # the engine ran out of KV memory and gave this request up,
                                  # or the router asked for it (drain): place it elsewhere
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

log = logging.getLogger("punica.cluster")


class EngineActor:
    def __init__(self, engine_id: int, config, torch_threads: int | None = None,
                 migrate_on_preempt: bool = True):
        import torch

        from ..engine.engine import Engine
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.engine_id = engine_id
        self.engine = Engine(config)
        self.migrate_on_preempt = migrate_on_preempt
        self.migrations_out = 0
        self._records: list[tuple] = []
        self._detach: list[str] = []            # ids the router takes away (drain)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._steps_seen = 0
        self._memory_at, self._memory = 0.0, {}
        self.engine.on_new_work = self._wake.set
        self._thread = threading.Thread(target=self._run, name="punica-engine", daemon=True)
        self._thread.start()

    # -- called by the router ----------------------------------------------------------------
    async def describe(self) -> dict:
        e = self.engine
        return {"engine_id": self.engine_id, "name": e.name, "model_cfg": e.model.cfg,
                "device": str(e.model.device), "dtype": str(e.model.dtype).replace("torch.", ""),
                "weight_bytes": e.model.weight_bytes, "max_model_len": e.max_model_len,
                "kv_blocks_total": e.kv.allocator.num_blocks, "block_size": e.kv.block_size,
                "max_batch": e.config.max_batch, "tokenizer": e.tokenizer,
                "node": _node_id()}

    async def submit(self, spec: dict) -> None:
        """Queues one request; failures come back as an error record, never as an exception."""
        rid = spec["request_id"]
        try:
            store = self.engine.store
            src = spec.get("adapter_source")
            if src is not None and spec["adapter"] not in store:
                store.register(spec["adapter"], src)
            resume = spec.get("resume_output_ids") or None
            gap = ""
            if resume:      # text the old engine held back (stop-string look-ahead)
                gap = _text_of(self.engine.tokenizer, spec["params"].stop, resume)[
                    spec.get("text_len", 0):]
            self.engine.add_request(None, spec["params"], spec["adapter"], request_id=rid,
                                    prompt_ids=spec["prompt_ids"], resume_output_ids=resume,
                                    stream=False, enforce_queue_limit=False)
            if gap:
                self._push([("out", rid, [], gap, False, None, None, None)])
        except Exception as e:  # noqa: BLE001 - reported on the request's stream
            self._push([("out", rid, [], "", True, "error", str(e), None)])

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def take(self, request_ids: list[str]) -> None:
        """Detaches these requests (drain); each comes back as a "migrate" record."""
        with self._lock:
            self._detach.extend(request_ids)
        self._wake.set()

    async def register_adapter(self, name: str, source) -> None:
        if name not in self.engine.store:
            self.engine.store.register(name, source)

    async def unregister_adapter(self, name: str) -> None:
        try:
            self.engine.unregister_adapter(name)
        except Exception:  # noqa: BLE001 - unknown here or still in use: nothing to do
            pass

    async def poll(self, timeout: float = 0.25) -> tuple[list[tuple], dict]:
        """Every record since the last poll (waits up to `timeout` for one), and a snapshot."""
        if self._event is None:
            self._aloop, self._event = asyncio.get_running_loop(), asyncio.Event()
        if not self._records:
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        with self._lock:
            records, self._records = self._records, []
        return records, self.snapshot()

    def snapshot(self) -> dict:
        e = self.engine
        st = e.status()
        new = e.metrics.counters["steps"] - self._steps_seen
        self._steps_seen += new
        now = time.time()
        st.update(engine_id=self.engine_id, migrations_out=self.migrations_out,
                  steps=e.metrics.recent(min(new, 256)) if new else [], time=now)
        if now - self._memory_at > 1.0:     # process RSS is not free to read: once a second
            self._memory_at, self._memory = now, e.memory()
        st["memory"] = self._memory
        return st

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.engine.close()

    # -- the engine thread -------------------------------------------------------------------
    def _push(self, records: list[tuple]) -> None:
        with self._lock:
            self._records.extend(records)
        if self._aloop is not None:
            try:
                self._aloop.call_soon_threadsafe(self._event.set)
            except RuntimeError:
                pass

    def _run(self) -> None:
        e = self.engine
        e.prepare_to_serve()            # pinned blocks and CUDA graphs first, as EngineLoop does
        while not self._stop.is_set():
            out: list[tuple] = []
            if self._detach:
                with self._lock:
                    ids, self._detach = self._detach, []
                out += self._take(ids)
            if not e.has_work():
                if out:
                    self._push(out)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                seen = e.scheduler.preemptions
                outputs = e.step()
                out += [("out", o.request_id, o.new_token_ids, o.delta, o.finished,
                         o.finish_reason, o.error, o.time_to_first_token)
                        for o in outputs if o is not None]
                if self.migrate_on_preempt and e.scheduler.preemptions != seen:
                    # out of KV memory: the scheduler put its newest requests back in the queue;
                    # rather than recompute them here, hand them to the router
                    out += self._take([r.id for r in e.scheduler.waiting if r.output_ids])
            except Exception:  # noqa: BLE001 - the loop must outlive any one step
                log.exception("engine %d: step raised; continuing", self.engine_id)
            if out:
                self._push(out)

    def _take(self, ids: list[str]) -> list[tuple]:
        """Removes requests from the engine (engine thread only) and frees their KV blocks."""
        e, out = self.engine, []
        for rid in ids:
            req = e._requests.get(rid)
            if req is None or req.finish_reason is not None:
                continue
            e.scheduler.finish(req)     # frees its blocks and slot; no output is emitted
            e._requests.pop(rid, None)
            self.migrations_out += 1
            out.append(("migrate", rid, list(req.output_ids)))
        return out


def _text_of(tokenizer, stop, ids: list[int]) -> str:
    from ..engine.detokenizer import IncrementalDetokenizer
    d = IncrementalDetokenizer(tokenizer, list(stop or []))
    for t in ids:
        d.add(t)
    return d.text


def _node_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests of the actor class itself)
        return None
