"""ServerConfig and ServerState: what every route and UI callback needs, passed down."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from punica_core import AsyncEngine, Engine


@dataclass(frozen=True)
class ServerConfig:
    model: str = "default"
    adapters_dir: str | None = "adapters"       # sample adapters registered at start-up
    lazy_adapters: bool = False                 # register them from config + header only
    adapter_dirs: tuple[str, ...] = ()          # folders /v1/load_lora_adapter may read from
    upload_dir: str | None = None               # where uploaded adapters are stored
    device: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    max_batch: int = 32
    max_adapters_on_gpu: int = 8
    max_waiting: int = 256
    allow_upload: bool = True
    max_upload_mb: int = 64
    api_key: str | None = None
    engines: int = 1
    cuda_graphs: bool = True                    # False: --enforce-eager


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    async_engine: AsyncEngine
    upload_dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def base_model_name(self) -> str:
        return self.engine.name
