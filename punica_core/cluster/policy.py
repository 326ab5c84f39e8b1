"""Routing decisions over engine snapshots: pure functions, no Ray, unit-testable.

Punica (Chen et al., 2023, section 5): a new request goes to the engine with the *largest*
running batch that is still below its max batch size and has free KV memory, ties broken by a
stable engine id, so that load packs onto as few GPUs as possible and the others drain. When no
engine has room the request waits in one FCFS queue. Two baselines for the simulation:
round-robin and least-loaded. Among equally good engines every policy prefers one that already
holds the request's adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class EngineView:
    id: int
    running: int                    # requests placed there and not finished
    max_batch: int
    free_blocks: int                # KV blocks not committed to placed requests
    adapters: frozenset = frozenset()   # adapters it holds (resident or in use)
    accepting: bool = True          # False while starting, draining, full or dead

    def has_room(self, need_blocks: int) -> bool:
        return self.accepting and self.running < self.max_batch and self.free_blocks >= need_blocks


class Policy:
    name = "base"

    def choose(self, engines: Sequence[EngineView], need_blocks: int,
               adapter: str | None = None) -> int | None:
        """The id of the engine that takes the request, or None: it waits."""
        raise NotImplementedError


class Consolidate(Policy):
    """Punica: the busiest engine that still has room."""
    name = "punica"

    def choose(self, engines, need_blocks, adapter=None):
        fits = [e for e in engines if e.has_room(need_blocks)]
        if not fits:
            return None
        return min(fits, key=lambda e: (-e.running, adapter not in e.adapters, e.id)).id


class LeastLoaded(Policy):
    """The engine with the smallest batch (spreads load; a baseline)."""
    name = "least_loaded"

    def choose(self, engines, need_blocks, adapter=None):
        fits = [e for e in engines if e.has_room(need_blocks)]
        if not fits:
            return None
        return min(fits, key=lambda e: (e.running, adapter not in e.adapters, e.id)).id


class RoundRobin(Policy):
    """The next engine in id order after the last one chosen, skipping full ones (a baseline)."""
    name = "round_robin"

    def __init__(self):
        self._last = -1

    def choose(self, engines, need_blocks, adapter=None):
        fits = sorted((e for e in engines if e.has_room(need_blocks)), key=lambda e: e.id)
        if not fits:
            return None
        pick = next((e for e in fits if e.id > self._last), fits[0])
        self._last = pick.id
        return pick.id


def make_policy(name: str) -> Policy:
    return {"punica": Consolidate, "round_robin": RoundRobin, "least_loaded": LeastLoaded}[name]()


def plan_drain(engines: Sequence[EngineView], requests: dict[int, list[int]],
               below: float) -> int | None:
    """Beyond the paper: picks a lightly loaded engine (running <= below * max_batch) whose
    requests all fit on busier engines, so that it can be emptied and released sooner.
    requests: engine id -> KV blocks each of its requests needs. Returns its id or None."""
    candidates = sorted((e for e in engines if e.accepting and 0 < e.running
                         <= below * e.max_batch), key=lambda e: (e.running, -e.id))
    for src in candidates:
        others = {e.id: [e.running, e.free_blocks] for e in engines
                  if e.accepting and e.id != src.id and e.running >= src.running}
        ok = True
        for need in sorted(requests.get(src.id, []), reverse=True):
            room = [(i, r) for i, r in others.items() if r[0] < _max_batch(engines, i)
                    and r[1] >= need]
            if not room:
                ok = False
                break
            i = max(room, key=lambda p: (p[1][0], -p[0]))[0]
            others[i][0] += 1
            others[i][1] -= need
        if ok and others:
            return src.id
    return None


def _max_batch(engines: Sequence[EngineView], engine_id: int) -> int:
    return next(e.max_batch for e in engines if e.id == engine_id)
