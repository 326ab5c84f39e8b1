"""ClusterLLM: punica_core.LLM's API over a cluster of engines. `LLM(model, engines=N)` returns
one."""
from __future__ import annotations

from dataclasses import replace

from ..config import EngineConfig
from ..engine.llm import LLM
from .config import ClusterConfig
from .engine import ClusterEngine


class ClusterLLM(LLM):
    """
    >>> llm = LLM("default", engines=2)         # two engine actors on a local Ray cluster
    >>> llm.generate(["Hi", "Hello"], SamplingParams(max_tokens=16, temperature=0))
    >>> llm.engine.engines()                    # each engine's batch
    """

    def __init__(self, model: str = "default", config: EngineConfig | None = None,
                 engines: int | None = None, cluster: ClusterConfig | None = None,
                 **overrides):
        if cluster is None:
            config = config or EngineConfig(model=model, **overrides)
            cluster = ClusterConfig(engine=config, max_engines=engines or 2)
        elif engines is not None:
            cluster = replace(cluster, max_engines=engines)
        self.engine = ClusterEngine(cluster)
        self.loop = self.engine.loop
