import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_dir():
    from punica_core.model.default_model import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def hf_model(default_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(default_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def default_loaded():
    """The default model loaded once for the whole session (engines share its weights)."""
    from punica_core.model.loader import load_model
    return load_model("default", "cpu", torch.float32)


@pytest.fixture(scope="session")
def parity_adapters(hf_model, tmp_path_factory):
    from helpers import PARITY_MIX, make_peft_adapter
    root = tmp_path_factory.mktemp("parity_adapters")
    return {name: make_peft_adapter(hf_model, root / name, r, t, rs, seed=i)
            for i, (name, (r, t, rs)) in enumerate(PARITY_MIX.items())}


@pytest.fixture
def make_engine(default_loaded):
    """Builds an Engine over the shared default weights; closes it afterwards."""
    from punica_core import Engine, EngineConfig
    made = []

    def make(**overrides):
        overrides.setdefault("kv_cache_gb", 0.25)
        overrides.setdefault("max_adapters_on_gpu", 4)
        e = Engine(EngineConfig(**overrides), loaded=default_loaded)
        made.append(e)
        return e
    yield make
    for e in made:
        e.close()
