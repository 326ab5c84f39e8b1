"""python -m app's flags reach the engine's config."""
from app.__main__ import parse_args, server_config
from app.server import engine_config


def test_flags_reach_the_engine_config():
    default = engine_config(server_config(parse_args([])))
    assert default.cuda_graphs and default.max_batch == 32 and default.model == "default"
    cfg = engine_config(server_config(parse_args(
        ["--enforce-eager", "--max-batch", "8", "--max-adapters-on-gpu", "3",
         "--model", "random:tiny", "--device", "cpu"])))
    assert not cfg.cuda_graphs and cfg.max_batch == 8 and cfg.max_adapters_on_gpu == 3
    assert cfg.model == "random:tiny" and cfg.device == "cpu"


def test_lazy_adapters_flag_registers_from_headers_only(tmp_path, default_loaded):
    """--lazy-adapters: the start-up registration reads no weights."""
    import shutil
    from pathlib import Path

    from app.server import build_state
    from punica_core import Engine
    src = Path(__file__).resolve().parents[2] / "adapters" / "pirate"
    shutil.copytree(src, tmp_path / "pirate")
    assert not server_config(parse_args([])).lazy_adapters
    cfg = server_config(parse_args(["--lazy-adapters", "--adapters", str(tmp_path),
                                    "--device", "cpu"]))
    engine = Engine(engine_config(cfg), loaded=default_loaded)
    lines = []
    try:
        state = build_state(cfg, engine=engine, progress=lines.append)
        assert "pirate" in engine.store and engine.store.parses == 0
        assert any("weights read on first use" in line for line in lines)
        assert state.engine is engine
    finally:
        engine.close()
