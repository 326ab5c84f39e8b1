"""The extension's build lists every kernel source in csrc/ (a file left out of SOURCES would
compile nowhere and fail only at link or load time on a GPU machine)."""
import importlib.util
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def load_config():
    spec = importlib.util.spec_from_file_location("build_ext_config", CSRC / "build_ext_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_source_and_header_is_listed():
    cfg = load_config()
    on_disk = {p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp")}
    assert set(cfg.SOURCES) == on_disk
    headers = {p.name for p in CSRC.iterdir() if p.suffix in (".h", ".cuh")}
    assert set(cfg.HEADERS) == headers


def test_sources_are_paths_into_csrc():
    cfg = load_config()
    for path in cfg.sources():
        assert Path(path).is_file() and Path(path).parent == CSRC
    assert all(p.startswith("csrc/") for p in cfg.sources(absolute=False))
