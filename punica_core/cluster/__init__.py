"""More than one engine: one engine per GPU as a Ray actor, and Punica's scheduler in front."""
from .config import ClusterConfig
from .engine import ClusterEngine
from .llm import ClusterLLM
from .policy import Consolidate, EngineView, LeastLoaded, RoundRobin, make_policy, plan_drain
from .router import Router, ensure_ray

__all__ = ["ClusterConfig", "ClusterEngine", "ClusterLLM", "Router", "ensure_ray",
           "EngineView", "Consolidate", "RoundRobin", "LeastLoaded", "make_policy", "plan_drain"]
