"""Builds the FastAPI app: engine start-up, sample adapters, API routes, Gradio at `/`."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from fastapi import FastAPI

from punica_core import AdapterError, AsyncEngine, Engine, EngineConfig

from .state import ServerConfig, ServerState

log = logging.getLogger("punica.app")


def discover_adapters(folder: str | None) -> list[Path]:
    """PEFT folders directly inside `folder` (each with adapter_config.json)."""
    if not folder or not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if (p / "adapter_config.json").is_file())


def engine_config(cfg: ServerConfig) -> EngineConfig:
    return EngineConfig(model=cfg.model, device=cfg.device, max_batch=cfg.max_batch,
                        max_adapters_on_gpu=cfg.max_adapters_on_gpu, max_waiting=cfg.max_waiting,
                        cuda_graphs=cfg.cuda_graphs)


def build_state(cfg: ServerConfig, engine: Engine | None = None, progress=print) -> ServerState:
    if engine is None:
        engine_cfg = engine_config(cfg)
        if cfg.engines > 1:
            from punica_core.cluster import ClusterConfig, ClusterEngine
            progress(f"[punica] starting up to {cfg.engines} engines on Ray ...")
            engine = ClusterEngine(ClusterConfig(engine=engine_cfg, max_engines=cfg.engines))
        else:
            progress(f"[punica] loading model {cfg.model!r} ...")
            engine = Engine(engine_cfg)
    progress(f"[punica] model {engine.name} on {engine.model.device} "
             f"({engine.model.weight_bytes / 2**20:.0f} MiB of weights)")
    found = discover_adapters(cfg.adapters_dir)
    if not found:
        progress(f"[punica] no adapters found in {cfg.adapters_dir!r}; upload some in the "
                 "Adapters tab or pass --adapters DIR")
    for path in found:
        try:
            info = engine.register_adapter(path.name, path, lazy=cfg.lazy_adapters)
            progress(f"[punica] adapter {info.name}: rank {info.rank}, "
                     f"targets {','.join(info.targets)}"
                     + (" (weights read on first use)" if cfg.lazy_adapters else ""))
        except AdapterError as e:
            progress(f"[punica] skipped adapter {path.name}: {e}")
    upload_dir = Path(cfg.upload_dir or tempfile.mkdtemp(prefix="punica-uploads-"))
    upload_dir.mkdir(parents=True, exist_ok=True)
    # a cluster brings its own router thread; a single engine gets an EngineLoop
    return ServerState(cfg, engine, AsyncEngine(engine, loop=getattr(engine, "loop", None)),
                       upload_dir)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="punica-playground")
    app.state.punica = state
    try:
        from .openai_api import build_router     # the OpenAI-compatible API (its own issue)
        app.include_router(build_router(state))
    except ImportError as e:
        if "openai_api" not in str(e):
            raise
    from .playground import mount_playground
    return mount_playground(app, state)
