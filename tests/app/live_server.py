"""A live server for tests: uvicorn in a thread on a free loopback port over one engine."""
import socket
import threading
import time

from punica_core import Engine, EngineConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, state, port):
        import uvicorn
        self.state, self.port = state, port
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self):
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.state.async_engine.loop.stop()
        self.state.engine.close()


def start_server(default_loaded, tmp_path_factory, adapters: dict, **cfg_overrides):
    from app.server import build_state, create_app
    from app.state import ServerConfig
    engine_cfg = dict(kv_cache_gb=0.5, max_adapters_on_gpu=4, max_batch=16)
    for key in ("max_waiting", "max_batch", "max_adapters_on_gpu"):
        if key in cfg_overrides:
            engine_cfg[key] = cfg_overrides[key]
    engine = Engine(EngineConfig(**engine_cfg), loaded=default_loaded)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    cfg = ServerConfig(adapters_dir=None, port=free_port(),
                       upload_dir=str(tmp_path_factory.mktemp("uploads")), **cfg_overrides)
    state = build_state(cfg, engine=engine, progress=lambda *_: None)
    return LiveServer(create_app(state), state, cfg.port).start()
