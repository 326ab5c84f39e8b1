"""SlotPool: a fixed number of device slots, one adapter per slot for all layers and
projections, zero-padded to the max rank. Ref-counted while running requests use a slot;
least recently used unused slots are evicted first. On CUDA, loads copy on a side stream and a
slot becomes ready when its copy has finished, so the decode loop never waits for it.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from ..errors import AdapterError, AdapterInUseError
from ..model.config import PROJECTIONS, ModelConfig
from .peft import LoraAdapter
from .stacking import Blob, DeviceOrders, check_finite, stack_into


@dataclass
class ProjectionWeights:
    a: torch.Tensor                 # [slots, layers, max_rank, in]
    b: torch.Tensor                 # [slots, layers, max_rank, out]
    ranks: torch.Tensor             # [slots] int32 on the device
    ranks_list: list[int]           # the same on the host


class SlotPool:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, dtype, device):
        self.num_slots, self.max_rank = num_slots, max_rank
        self.device = torch.device(device)
        self.projections = PROJECTIONS
        self.col_offsets = cfg.col_offsets
        self.weights: dict[str, ProjectionWeights] = {}
        cuda = self.device.type == "cuda"
        # every projection's ranks in one tensor (row i: projection i), so that a load or an
        # eviction sets a slot's ranks with one call: each torch call on the engine thread
        # hands the GIL over, and waits for it while loader threads run Python
        self._ranks = torch.zeros(len(cfg.proj_shapes), num_slots, dtype=torch.int32,
                                  device=self.device)
        self._rank_cols = [self._ranks[:, s] for s in range(num_slots)]
        # a load's ranks go through this pinned row (written with numpy: no torch call),
        # then one non-blocking copy; a slot's row is rewritten only by its next load
        self._rank_rows = torch.zeros(num_slots, len(cfg.proj_shapes), dtype=torch.int32,
                                      pin_memory=cuda)
        self._rank_rows_np = self._rank_rows.numpy()
        self._rank_row_views = [self._rank_rows[s] for s in range(num_slots)]
        for i, (p, (fan_in, fan_out)) in enumerate(cfg.proj_shapes.items()):
            shape = (num_slots, cfg.num_layers, max_rank)
            self.weights[p] = ProjectionWeights(
                a=torch.zeros(*shape, fan_in, dtype=dtype, device=self.device),
                b=torch.zeros(*shape, fan_out, dtype=dtype, device=self.device),
                ranks=self._ranks[i], ranks_list=[0] * num_slots)
        # each slot's (a, b) per projection, made once: indexing is a torch call too
        self._slot_views = [[(w.a[s], w.b[s]) for w in self.weights.values()]
                            for s in range(num_slots)]
        self._slot_of: dict[str, int] = {}
        self._name_of: list[str | None] = [None] * num_slots
        self._refs = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()   # unused resident slots, oldest first
        self._pending: dict[int, object] = {}               # slot -> CUDA event of its copy
        # slots stacked on the device (adapter.raw): slot -> the "all finite" flag, read
        # once the copy is done; a failed check frees the slot and calls on_failure
        self._checks: dict[int, torch.Tensor] = {}
        # made once, not per load: a pinned allocation on the engine thread waited behind the
        # loader threads' fresh pinned allocations (the driver pins under one lock)
        self._flags = torch.ones(num_slots, dtype=torch.bool, pin_memory=cuda)
        self._flag_views = [self._flags[s] for s in range(num_slots)]
        self._orders = DeviceOrders(self.device, cfg.num_layers)
        self._where: dict[int, str] = {}
        self.on_failure = None      # (name, message) -> None; the scheduler sets the store's
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._compute_done = torch.cuda.Event() if cuda else None     # reused by every load
        self.evictions = 0
        self.loads = 0
        # slot loads: (issued, first seen ready) perf_counter times, the latest 4096
        self.load_times: deque[tuple[float, float]] = deque(maxlen=4096)
        self._issued: dict[int, float] = {}

    @property
    def loads_asynchronously(self) -> bool:
        """Loads copy on a side stream (CUDA) and are ready later; on a CPU they are done when
        load returns."""
        return self._stream is not None

    @property
    def nbytes(self) -> int:
        return sum(w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size()
                   for w in self.weights.values())

    def rank_of(self, proj: str, slot: int) -> int:
        return self.weights[proj].ranks_list[slot]

    def lookup(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def is_ready(self, slot: int) -> bool:
        event = self._pending.get(slot)
        if event is not None:
            if not event.query():
                return False
            del self._pending[slot]
            self.load_times.append((self._issued.pop(slot, 0.0), time.perf_counter()))
        flag = self._checks.pop(slot, None)
        if flag is not None and not bool(flag):     # the copy is done: no wait to read it
            return self._verify(slot)
        return True

    def _verify(self, slot: int) -> bool:
        """A stacked slot's sums were not finite: the exact per-layer check. NaN / inf found:
        named as the host parse does, the slot freed and the store told (its requests fail
        with this message); False. Only an overflowing sum of finite weights: True."""
        name = self._name_of[slot]
        try:
            for p, w in self.weights.items():
                r = w.ranks_list[slot]
                if r:
                    check_finite(w.a[slot, :, :r], w.b[slot, :, :r],
                                 self._where.get(slot, name), p)
            return True
        except AdapterError as e:       # the host parse's own message, naming the layer
            message = str(e)
        self._lru.pop(slot, None)
        self._forget(slot)
        if self.on_failure is not None:
            self.on_failure(name, message)
        return False

    def acquire(self, slot: int) -> None:
        self._refs[slot] += 1
        self._lru.pop(slot, None)

    def release(self, slot: int) -> None:
        self._refs[slot] -= 1
        assert self._refs[slot] >= 0, "slot released more often than acquired"
        if self._refs[slot] == 0:
            self._lru[slot] = None

    def in_use(self, name: str) -> bool:
        slot = self._slot_of.get(name)
        return slot is not None and self._refs[slot] > 0

    def load(self, adapter: LoraAdapter, keep: set[str] = frozenset()) -> int | None:
        """Puts the adapter in a free (or least recently used, unused) slot, never evicting the
        adapters named in `keep`. None if no slot can be had. An adapter already resident
        keeps its slot (two slots under one name would break the name -> slot map)."""
        if adapter.name in self._slot_of:
            return self._slot_of[adapter.name]
        slot = self._free_slot(keep)
        if slot is None:
            return None
        self._name_of[slot] = adapter.name
        self._slot_of[adapter.name] = slot
        self._lru[slot] = None
        t_issue = time.perf_counter()
        if self._stream is not None:
            # wait for the compute stream's last use of this slot before overwriting it
            self._compute_done.record(torch.cuda.current_stream(self.device))
            self._stream.wait_event(self._compute_done)
            with torch.cuda.stream(self._stream):
                self._copy(slot, adapter)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._pending[slot] = event
            self._issued[slot] = t_issue
        else:
            self._copy(slot, adapter)
        self.loads += 1
        return slot

    def _copy(self, slot: int, adapter: LoraAdapter) -> None:
        if adapter.raw is not None:
            self._stack_raw(slot, adapter)
            return
        for p, w in self.weights.items():
            r = adapter.rank_of(p)
            if r:
                a, b = adapter.weights[p]
                w.a[slot, :, :r].copy_(a, non_blocking=True)
                w.b[slot, :, :r].copy_(b, non_blocking=True)
            # zero what a previous, larger adapter left behind (kernels read only :rank, but
            # the padded torch paths read everything)
            w.a[slot, :, r:].zero_()
            w.b[slot, :, r:].zero_()
        self._set_ranks(slot, adapter)

    def _set_ranks(self, slot: int, adapter: LoraAdapter) -> None:
        """The slot's rank of every projection, on the host and (one copy) on the device."""
        for i, (p, w) in enumerate(self.weights.items()):
            w.ranks_list[slot] = self._rank_rows_np[slot, i] = adapter.rank_of(p)
        # from the pinned row: a pageable host value (`ranks[slot] = r`) would first wait for
        # all the work queued on the stream (here: the copies above)
        self._rank_cols[slot].copy_(self._rank_row_views[slot], non_blocking=True)

    def _stack_raw(self, slot: int, adapter: LoraAdapter) -> None:
        """The file's bytes to the device, then stacked into the slot there (the transpose and
        scaling at device bandwidth; the host only read the file) and checked for NaN / inf
        into a flag that is_ready reads once the copy is done."""
        raw = adapter.raw
        blob = Blob(raw.blob.to(self.device, non_blocking=True), self._orders)
        stacked = []
        for p, (a, b) in zip(self.weights, self._slot_views[slot]):
            items = raw.items.get(p)
            if items:
                stack_into(a, b, items, blob)
                stacked += [a, b]       # rows past rank r are zeros: they change no norm
            else:
                a.zero_()
                b.zero_()
        self._set_ranks(slot, adapter)
        # a NaN or inf makes its norm NaN or inf; finite values only by overflow (which the
        # exact check in _verify then lets pass). One multi-tensor call for all of them, not
        # a sum per tensor: every torch call here holds the engine's thread (a 7B load on a
        # 2-core CPU: 23 -> 15 ms; ~4 ms on the H200 host before). In float32, as the sums
        # were: an fp16 adapter's norm may pass 65504.
        if stacked:
            norms = torch._foreach_norm(stacked, 2, dtype=torch.float32)
            finite = torch.isfinite(torch.stack(norms)).all()
        else:
            finite = torch.ones((), dtype=bool, device=self.device)
        # this slot's flag is written again only by its next load, queued after this one on
        # the same stream, and read only once that load's event has completed
        flag = self._flag_views[slot]
        flag.copy_(finite, non_blocking=True)
        self._checks[slot] = flag
        self._where[slot] = raw.where

    def _free_slot(self, keep: set[str]) -> int | None:
        for s in range(self.num_slots):
            if self._name_of[s] is None:
                return s
        slot = next((s for s in self._lru if self._name_of[s] not in keep), None)
        if slot is None:
            return None
        del self._lru[slot]
        self._forget(slot)
        self.evictions += 1
        return slot

    def _forget(self, slot: int) -> None:
        name = self._name_of[slot]
        if name is not None:
            del self._slot_of[name]
        self._name_of[slot] = None
        self._pending.pop(slot, None)
        self._issued.pop(slot, None)
        self._checks.pop(slot, None)
        self._where.pop(slot, None)
        for w in self.weights.values():
            w.ranks_list[slot] = 0
        self._rank_cols[slot].zero_()   # no host wait for the compute stream (see _set_ranks)

    def evict(self, name: str) -> None:
        """Drops an adapter from the device; refused while a running request uses it."""
        slot = self._slot_of.get(name)
        if slot is None:
            return
        if self._refs[slot] > 0:
            raise AdapterInUseError(f"adapter {name!r} is used by {self._refs[slot]} running "
                                    "request(s)")
        self._lru.pop(slot, None)
        self._forget(slot)

    def snapshot(self) -> dict:
        return {"slots": self.num_slots,
                "resident": [n for n in self._name_of if n is not None],
                "in_use": {self._name_of[s]: r for s, r in enumerate(self._refs) if r},
                # read-only: other threads (status panels) call this beside the engine's
                "loading": [self._name_of[s] for s, event in list(self._pending.items())
                            if event is not None and not event.query()],
                "evictions": self.evictions, "loads": self.loads}
