"""AdapterStore: adapter name -> source, plus a bounded LRU host cache of parsed adapters.

Adapters are validated when registered (so a bad one is refused at once). If the host cache
later drops one, it is re-read from its source on a background thread: the engine loop never
waits on disk. A lazy registration (for registries of thousands of adapter folders) checks the
config and the safetensors header only; the weights are read, and their values checked, when a
request first needs them.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterError, UnknownAdapterError
from ..model.config import ModelConfig
from .pinned_memory import block_plan, reserve_blocks, use_registered_host_memory
from .peft import (LoraAdapter, ReadBuffers, inspect_adapter, parse_adapter, read_raw_adapter,
                   validate_name)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    rank: int
    targets: tuple[str, ...]
    nbytes: int
    source: str
    use_rslora: bool
    base_model: str | None


class AdapterStore:
    def __init__(self, model_cfg: ModelConfig, max_rank: int, host_cache_size: int = 64,
                 max_adapter_bytes: int = 512 << 20, pin_memory: bool = False,
                 dtype: torch.dtype = torch.float32, device_stacking: bool = False,
                 loader_workers: int = 4):
        self.model_cfg = model_cfg
        self.dtype = dtype              # the slot pool's: a load then copies without converting
        self.max_rank = max_rank
        self.host_cache_size = host_cache_size
        self.max_adapter_bytes = max_adapter_bytes
        self.pin_memory = pin_memory
        # the host cache's pinned memory: malloc + cudaHostRegister, not cudaHostAlloc
        # (pinned_memory.py: a cold 7B adapter parse waited ~57 ms on the driver's lock)
        self.registered_host_memory = pin_memory and use_registered_host_memory()
        # adapters read in the background (lazy ones, and re-reads after the host cache
        # dropped them) keep the file's bytes; the slot load stacks and checks them on the
        # device (peft.read_raw_adapter). Registration still parses and checks on the host.
        self.device_stacking = device_stacking
        self._sources: dict[str, object] = {}
        self._info: dict[str, AdapterInfo] = {}
        self._cache: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._loading: dict[str, object] = {}
        self._fresh: set[str] = set()   # read ahead, not yet taken: evicted last
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self.parses = 0                 # adapters read and parsed from their sources so far
        self.parse_seconds = 0.0
        # background reads: (queued, started, done) perf_counter times, the latest 4096
        self.read_times: deque[tuple[float, float, float]] = deque(maxlen=4096)
        # a few workers read adapters in parallel (a parse is mostly reads and torch copies);
        # how many pay off beside a busy engine loop is measured by engine_gpu.py
        # --loader-workers (EngineConfig.adapter_loader_workers)
        self.loader_workers = loader_workers
        self._pool = ThreadPoolExecutor(max_workers=loader_workers,
                                        thread_name_prefix="adapter-loader")
        # weights files are read into kept buffers: a fresh one costs more in page faults
        # than the read itself (at most 256 MB stay allocated between loads)
        self.read_buffers = ReadBuffers(keep_bytes=256 << 20)

    # -- registry --------------------------------------------------------------------------
    def register(self, name: str, source, lazy: bool = False) -> AdapterInfo:
        """Validates now and caches; raises AdapterError on anything that cannot be served.
        lazy (adapter folders only): checks the config and the safetensors header now, and
        reads the weights on first use (a bad weight value then fails that request)."""
        validate_name(name)
        with self._lock:
            if name in self._sources:
                raise AdapterError(f"an adapter named {name!r} is already registered; unload it "
                                   "first")
        adapter = None
        if lazy:
            plan = inspect_adapter(name, source, self.model_cfg, self.max_rank,
                                   self.max_adapter_bytes)
            info = AdapterInfo(name, plan.rank, plan.targets, plan.file_bytes, plan.label,
                               plan.use_rslora, plan.base_model)
        else:
            adapter = self._parse(name, source)
            info = AdapterInfo(name, adapter.rank, adapter.targets, adapter.nbytes,
                               adapter.source, adapter.use_rslora, adapter.base_model)
        with self._lock:
            if name in self._sources:
                raise AdapterError(f"an adapter named {name!r} is already registered")
            # in-memory uploads cannot be re-read, so they stay cached for good
            self._sources[name] = source if not isinstance(source, dict) else None
            self._info[name] = info
            if adapter is not None:
                self._put(name, adapter)
        return info

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._sources:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            del self._sources[name], self._info[name]
            self._cache.pop(name, None)
            self._fresh.discard(name)
            self._errors.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def names(self) -> list[str]:
        return list(self._sources)

    def info(self, name: str) -> AdapterInfo:
        try:
            return self._info[name]
        except KeyError:
            raise UnknownAdapterError(f"unknown adapter {name!r}") from None

    def infos(self) -> list[AdapterInfo]:
        return list(self._info.values())

    # -- host cache ------------------------------------------------------------------------
    def get_cached(self, name: str) -> LoraAdapter | None:
        with self._lock:
            adapter = self._cache.get(name)
            if adapter is not None:
                self._cache.move_to_end(name)
            return adapter

    def taken(self, name: str) -> None:
        """The adapter read ahead has reached a slot: the host cache may drop it first."""
        with self._lock:
            self._fresh.discard(name)

    def is_cached(self, name: str) -> bool:
        return name in self._cache

    def load_error(self, name: str) -> str | None:
        return self._errors.get(name)

    def prefetch(self, name: str) -> None:
        """Starts reading the adapter from its source in the background (idempotent)."""
        with self._lock:
            if name not in self._sources:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            if name in self._cache or name in self._loading:
                return
            if len(self._loading) >= self.host_cache_size:
                return      # the cache could not hold more: reading them would evict others
            source = self._sources[name]
            self._errors.pop(name, None)
            self._loading[name] = self._pool.submit(self._load_in_background, name, source,
                                                    time.perf_counter())

    def _load_in_background(self, name: str, source, queued: float = 0.0) -> None:
        started = time.perf_counter()
        try:
            adapter = self._parse(name, source, raw=self.device_stacking)
            with self._lock:
                if name in self._sources:
                    self._put(name, adapter)
                    self._fresh.add(name)
        except AdapterError as e:
            self._errors[name] = str(e)
        except Exception as e:  # noqa: BLE001 - surfaced to the waiting request
            self._errors[name] = f"adapter {name!r} failed to load: {e}"
        finally:
            with self._lock:
                self._loading.pop(name, None)
                self.read_times.append((queued, started, time.perf_counter()))

    def _parse(self, name, source, raw: bool = False) -> LoraAdapter:
        if source is None:
            raise AdapterError(f"adapter {name!r} was uploaded and is no longer cached")
        pin = self.pin_memory and torch.cuda.is_available()
        t0 = time.perf_counter()
        try:
            if raw and isinstance(source, (str, Path)) and Path(source).is_dir():
                return read_raw_adapter(name, source, self.model_cfg, self.max_rank,
                                        self.max_adapter_bytes, pin_memory=pin)
            return parse_adapter(name, source, self.model_cfg, self.max_rank,
                                 self.max_adapter_bytes, dtype=self.dtype, pin_memory=pin,
                                 buffers=self.read_buffers)
        finally:
            with self._lock:
                self.parses += 1
                self.parse_seconds += time.perf_counter() - t0

    def reserve_pinned_blocks(self) -> int:
        """Pins, before serving, the blocks that background reads of the registered adapter
        folders will take (their file sizes; the host cache's room plus a read per loader
        thread at most), so that a cold start pins nothing while the engine runs. Bytes
        pinned; 0 unless reads are kept as file bytes in pinned memory (device stacking on
        CUDA). Engine.prepare_to_serve calls it (EngineConfig.reserve_pinned_host_cache);
        measured with engine_gpu.py --reserve-pinned on / off: 7B, 1000 adapters, cold, 0.90x
        vs 0.86x resident (benchmarks/results/diag/engine_gpu_h200_7b_many_shadow*.json)."""
        if not (self.pin_memory and self.device_stacking and torch.cuda.is_available()):
            return 0
        with self._lock:
            sizes = [self._info[n].nbytes for n, src in self._sources.items()
                     if isinstance(src, (str, Path)) and Path(src).is_dir()]
        return reserve_blocks(block_plan(sizes, self.host_cache_size + self.loader_workers))

    def mark_failed(self, name: str, message: str) -> None:
        """A slot load found the adapter's weights bad (device stacking): its requests fail
        with message (as when a background read fails), and it leaves the host cache."""
        with self._lock:
            self._errors[name] = message
            self._cache.pop(name, None)
            self._fresh.discard(name)

    def _put(self, name: str, adapter: LoraAdapter) -> None:
        self._cache[name] = adapter
        self._cache.move_to_end(name)
        while len(self._cache) > self.host_cache_size:
            # oldest first, re-readable ones only, adapters read ahead and not yet taken last
            order = sorted(self._cache, key=lambda n: n in self._fresh)
            victim = next(n for n in order if self._sources.get(n) is not None or n == name)
            if victim == name:
                break
            self._cache.pop(victim)
            self._fresh.discard(victim)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
