"""The committed sample adapters (adapters/): each is a small standard PEFT folder that loads in
PEFT and in our engine, and served together with the base model in one batch, each changes the
model's behaviour on held-out prompts by a clear margin."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "adapters"


def _load(name: str):
    """adapters/NAME.py under a unique module name (a PyPI package may be called `evaluate`)."""
    sys.path.insert(0, str(ADAPTERS))       # evaluate.py imports recipes
    spec = importlib.util.spec_from_file_location(f"sample_adapters_{name}", ADAPTERS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


recipes = _load("recipes")
evaluate = _load("evaluate")

NAMES = list(recipes.SPECS)
MAX_BYTES = 10 * 1000 * 1000
N_PROMPTS = 4
MAX_TOKENS = 40


def _default_model_dir():
    try:
        from punica_core.model.default_model import default_model_dir
        return default_model_dir()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"default model not installed: {e}")


def test_committed_folders_are_standard_and_small():
    shapes = set()
    for n in NAMES:
        folder = ADAPTERS / n
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, n
        assert not any(f.endswith(".bin") for f in files), n
        size = (folder / "adapter_model.safetensors").stat().st_size
        assert size <= MAX_BYTES, f"{n}: {size} bytes"
        cfg = json.loads((folder / "adapter_config.json").read_text())
        spec = recipes.SPECS[n]
        assert cfg["peft_type"] == "LORA" and cfg["r"] == spec.r, n
        assert sorted(cfg["target_modules"]) == sorted(spec.targets), n
        assert not cfg.get("use_dora") and not cfg.get("modules_to_save"), n
        assert bool(cfg.get("use_rslora")) == spec.use_rslora, n
        shapes.add((cfg["r"], tuple(sorted(cfg["target_modules"]))))
    assert len(shapes) == len(NAMES), "the sample adapters should all have different shapes"
    assert any(recipes.SPECS[n].use_rslora for n in NAMES)
    assert max(recipes.SPECS[n].r for n in NAMES) == 64


def test_training_and_heldout_prompts_do_not_overlap():
    train = {r["prompt"] for r in recipes.train_prompts()}
    held = recipes.heldout_prompts()
    assert not train & set(held)
    assert not {r["topic"] for r in recipes.train_prompts()} & set(recipes.HELDOUT_TOPICS)


def test_adapters_load_in_peft():
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(_default_model_dir(), dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, str(ADAPTERS / NAMES[0]), adapter_name=NAMES[0])
    for n in NAMES[1:]:
        pm.load_adapter(str(ADAPTERS / n), adapter_name=n)
    assert set(NAMES) <= set(pm.peft_config)
    for n in NAMES:
        assert pm.peft_config[n].r == recipes.SPECS[n].r


@pytest.fixture(scope="module")
def served():
    """All adapters + base on a few held-out prompts, in one generate call of our engine."""
    _default_model_dir()
    from punica_core import LLM
    prompts = recipes.heldout_prompts()[:N_PROMPTS]
    llm = LLM("default", max_batch=64)
    try:
        res = evaluate.run_engine(NAMES, prompts, MAX_TOKENS, llm=llm)
    finally:
        llm.close()
    return res, prompts


@pytest.mark.parametrize("name", NAMES)
def test_adapter_behaviour_beats_base(served, name):
    res, prompts = served
    s = evaluate.score(res["outputs"], [name], prompts)[name]
    assert s["adapter_score"] - s["base_score"] >= s["required_margin"], \
        f"{name}: {s['metric']} adapter {s['adapter_score']:.3f} vs base {s['base_score']:.3f}\n" \
        + "\n".join(o for o, _ in res["outputs"][name])


def test_all_adapters_shared_decode_steps(served):
    res, _ = served
    steps = res["steps"]
    if steps is None:
        pytest.skip("the engine keeps no step records")
    # every adapter and the base request ran together in the same steps (terse answers end
    # after ~20 tokens, so not for all MAX_TOKENS of them)
    assert steps["max_distinct_adapters_in_a_step"] == len(NAMES) + 1, steps
    assert steps["steps_with_all_adapters_and_base"] >= 8, steps
    # shared steps: far fewer steps than one request at a time would need
    assert steps["steps"] <= 2 * MAX_TOKENS, steps
