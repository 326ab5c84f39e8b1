"""Continuous batching. Each step: decode rows for running requests, then prefill chunks,
then new admissions, all under one token budget. Admission needs KV blocks for the whole
known sequence and the adapter resident in a slot; a request whose adapter is still loading
waits in the queue while others pass it, but nobody passes a request that waits for KV
blocks (FCFS, no starvation). When decode runs out of blocks, the newest running request is
preempted and later recomputed with one prefill; its stream goes on where it was.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice
from dataclasses import dataclass, field

from ..adapters.slots import SlotPool
from ..adapters.store import AdapterStore
from ..config import EngineConfig
from ..model.kv_cache import KVCache
from .layout import ScheduledChunk
from .request import Request, Status

# slot loads per load_ahead call on a GPU: an uncontended 7B rank-16 load issues in ~1.1 ms
# of the engine thread's time, a 7B decode step computes for ~7 ms (on a CPU no cap: there a
# load is a copy done at once, and nothing computes meanwhile)
SLOT_LOADS_PER_CALL = 4
# in a step's shadow, stop issuing slot loads (after the first) once the step has finished on
# the GPU, so that loads never hold its tokens back. Not measured yet (engine_gpu.py
# --stop-loads-when-step-done on), so off
STOP_LOADS_WHEN_STEP_DONE = False


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)   # refused at admission

    @property
    def empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVCache, pool: SlotPool, store: AdapterStore,
                 max_model_len: int):
        self.cfg, self.kv, self.pool, self.store = cfg, kv, pool, store
        # a slot stacked on the device that fails its NaN / inf check fails its requests
        # like a bad read from disk: through the store's load_error
        pool.on_failure = store.mark_failed
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.cfg.max_tokens_per_step
        picked: list[tuple[Request, int]] = []
        # 1. decode rows, oldest first; preempt the newest when blocks run out
        for req in sorted(self.running, key=lambda r: r.seq):
            if req.status is not Status.RUNNING or req.pending != 1 or budget == 0:
                continue
            if not self._grow(req, req.num_tokens):
                continue            # req itself was preempted
            picked.append((req, 1))
            budget -= 1
        # 2. running requests part-way through their prefill
        for req in sorted(self.running, key=lambda r: r.seq):
            if req.pending > 1 and budget > 0:
                n = min(req.pending, budget)
                picked.append((req, n))
                budget -= n
        # 3. admissions, FCFS, of requests whose adapter is ready in a slot. Slot loads are
        # not started here but by load_ahead, which the engine calls while the GPU computes
        # the step: on the engine's thread a slot load costs its torch calls' GIL handovers,
        # and a first step held back by a run of them idled the GPU (1000 adapters, cold
        # host cache, 7B: 0.6 s before the first step; 0.04 s warm)
        for req in list(self.waiting):
            if budget == 0 or len(self.running) >= self.cfg.max_batch:
                break
            ready = self._adapter_ready(req, batch)
            if ready is None:
                continue            # failed; reported below
            if not ready:
                continue            # adapter loading: let later requests go first
            if self.kv.blocks_needed(req.num_tokens + 1) > self.kv.allocator.num_free:
                break               # nobody passes a request waiting for memory
            self.waiting.remove(req)
            req.block_table = self.kv.allocator.allocate(self.kv.blocks_needed(req.num_tokens))
            req.num_computed = 0
            req.status = Status.RUNNING
            if req.adapter is not None:
                req.slot = self.pool.lookup(req.adapter)
                self.pool.acquire(req.slot)
            self.running.append(req)
            n = min(req.pending, budget)
            picked.append((req, n))
            budget -= n
        # rows grouped by adapter slot: each adapter's rows form one SGMV segment
        picked.sort(key=lambda p: (p[0].slot, p[0].seq))
        for req, n in picked:
            start = req.num_computed
            batch.requests.append(req)
            batch.chunks.append(ScheduledChunk(
                token_ids=req.ids(start, start + n), first_pos=start,
                block_table=req.block_table, slot=req.slot, sample=start + n == req.num_tokens))
        return batch

    def _adapter_ready(self, req: Request, batch: ScheduledBatch) -> bool | None:
        """True when the adapter is in a ready slot; False while it is read or loads (or
        waits for load_ahead to load it); None if it failed."""
        name = req.adapter
        if name is None:
            req.slot = -1
            return True
        slot = self.pool.lookup(name)
        if slot is not None:
            return self.pool.is_ready(slot)
        if name not in self.store:
            self._refuse(req, batch, f"adapter {name!r} was unloaded before the request ran")
            return None
        error = self.store.load_error(name)
        if error:
            self._refuse(req, batch, error)
            return None
        return False

    def load_ahead(self, max_slot_loads: int | None = None,
                   step_done: Callable[[], bool] | None = None) -> int:
        """Starts loading the adapters of the next waiting requests (disk -> host cache ->
        slot), in queue order, so that they are resident when admission looks again; how many
        slot loads it issued. Never evicts an adapter that one of those requests wants. The
        engine calls it while the GPU computes a step (and when nothing is runnable); at most
        max_slot_loads slot loads a call, so that a run of them never holds a step's result
        back for long (the rest load in the next steps' shadow). None: SLOT_LOADS_PER_CALL
        where loads are asynchronous (CUDA), no cap on a CPU. step_done (in a step's shadow,
        with STOP_LOADS_WHEN_STEP_DONE): once it says the step has finished, no more slot
        loads after the first this call."""
        if max_slot_loads is None:
            max_slot_loads = SLOT_LOADS_PER_CALL if self.pool.loads_asynchronously \
                else self.pool.num_slots
        wanted = list(dict.fromkeys(r.adapter for r in islice(self.waiting, self.cfg.max_batch)
                                    if r.adapter is not None))
        keep = set(wanted)
        issued = 0
        room = True
        for name in wanted:
            if self.pool.lookup(name) is not None or name not in self.store \
                    or self.store.load_error(name):
                continue
            adapter = self.store.get_cached(name)
            if adapter is None:
                self.store.prefetch(name)
            elif room and issued < max_slot_loads and not (
                    issued and step_done is not None and STOP_LOADS_WHEN_STEP_DONE
                    and step_done()):
                # no slot for this one means none for the rest (the same keep): they are only
                # read into the host cache, not tried again each (engine_gpu.py
                # --many-adapters on 7B: 5700 failed slot loads a run, ~0.04 s)
                room = self._load_into_slot(name, adapter, keep) is not None
                issued += room
        self._read_ahead(keep)
        return issued

    def _load_into_slot(self, name: str, adapter, keep: set[str]) -> int | None:
        slot = self.pool.load(adapter, keep)
        if slot is not None:
            self.store.taken(name)
        return slot

    def _read_ahead(self, near: set[str]) -> None:
        """Deeper in the queue, only reads from disk into the host cache (no slot), in queue
        order, for as many adapters (neither cached nor in a slot) as the host cache holds
        beyond a batch's worth: the loader threads stay busy while the batch decodes, and what
        they read ahead leaves room for the nearer requests' adapters (the cache drops adapters
        read ahead and not yet taken last, oldest first)."""
        budget = self.store.host_cache_size - self.cfg.max_batch
        seen = set(near)
        for r in islice(self.waiting, self.cfg.max_batch, None):
            name = r.adapter
            if budget <= 0:
                break
            if name is None or name in seen:
                continue
            seen.add(name)
            if self.pool.lookup(name) is not None or name not in self.store \
                    or self.store.load_error(name) or self.store.is_cached(name):
                continue
            self.store.prefetch(name)
            budget -= 1

    def _refuse(self, req: Request, batch: ScheduledBatch, why: str) -> None:
        self.waiting.remove(req)
        batch.failed.append((req, why))

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Makes room for num_tokens in req's block table, preempting the newest running
        requests if needed. False if req itself had to be preempted."""
        need = self.kv.blocks_needed(num_tokens) - len(req.block_table)
        while need > self.kv.allocator.num_free:
            victim = max((r for r in self.running), key=lambda r: r.seq)
            self.preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.block_table += self.kv.allocator.allocate(need)
        return True

    def preempt(self, req: Request) -> None:
        """Frees req's blocks and slot; it goes back to the head of the queue to recompute."""
        self._release(req)
        req.status = Status.WAITING
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.preemptions += 1

    def finish(self, req: Request) -> None:
        if req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = Status.FINISHED

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.block_table:
            self.kv.allocator.free(req.block_table)
            req.block_table = []
        if req.slot >= 0 and req.status is Status.RUNNING:
            self.pool.release(req.slot)
        req.slot = -1

    def complete_step(self, req: Request, n: int) -> None:
        req.num_computed += n
