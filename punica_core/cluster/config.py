"""ClusterConfig: how many engines, which routing policy, when to migrate, start and release."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import EngineConfig

POLICIES = ("punica", "round_robin", "least_loaded")


@dataclass(frozen=True)
class ClusterConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)   # every engine's config
    max_engines: int = 2            # engines at most (one per GPU)
    initial_engines: int | None = None  # started at once (None: max_engines)
    min_engines: int = 1            # never released below this
    idle_release_s: float | None = 60.0   # release an engine idle this long (None: never)
    policy: str = "punica"          # "punica" (consolidate), "round_robin", "least_loaded"
    migrate_on_preempt: bool = True  # out of KV mid-generation: move the newest request away
    drain: bool = False             # beyond the paper: empty lightly loaded engines
    drain_below: float = 0.25       # ... those running at most this fraction of max_batch
    max_waiting: int | None = None  # the cluster's FCFS queue bound (None: engine.max_waiting)
    address: str | None = None      # ray.init(address): None starts a local Ray cluster
    num_cpus_per_engine: float = 1.0    # Ray resources of one engine actor (CPU engines)
    torch_threads: int | None = None    # torch threads inside a CPU engine actor
    per_engine: tuple[tuple[int, dict], ...] = ()   # ((engine id, EngineConfig overrides), ...)
    poll_timeout_s: float = 0.25    # long-poll of an engine's outputs

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r}: choose from {', '.join(POLICIES)}")
        if self.max_engines < 1:
            raise ValueError("max_engines must be >= 1")
        if not 0 <= self.min_engines <= self.max_engines:
            raise ValueError("min_engines must be in [0, max_engines]")
        n = self.initial_engines
        if n is not None and not 0 <= n <= self.max_engines:
            raise ValueError("initial_engines must be in [0, max_engines]")

    @property
    def start_engines(self) -> int:
        return max(self.max_engines if self.initial_engines is None else self.initial_engines,
                   self.min_engines, 1)

    def engine_config(self, engine_id: int) -> EngineConfig:
        from dataclasses import replace
        overrides = dict(self.per_engine).get(engine_id)
        return replace(self.engine, **overrides) if overrides else self.engine
