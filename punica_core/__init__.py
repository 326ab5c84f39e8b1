"""punica-playground: multi-tenant LoRA serving, many adapters in one decode loop."""
from .config import EngineConfig
from .engine.async_engine import AsyncEngine
from .engine.engine import Engine
from .engine.llm import LLM
from .engine.request import RequestOutput
from .engine.sampling import SamplingParams
from .errors import (AdapterError, AdapterInUseError, InvalidRequestError, PromptTooLongError,
                     PunicaError, QueueFullError, RequestFailedError, UnknownAdapterError)

__all__ = ["LLM", "Engine", "AsyncEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "PunicaError", "AdapterError", "UnknownAdapterError", "AdapterInUseError",
           "QueueFullError", "PromptTooLongError", "InvalidRequestError", "RequestFailedError"]
