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
