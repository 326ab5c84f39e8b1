"""Adapters of one structure share one header check (peft._plan, plan_memo.PlanMemo); what
differs between them (name, folder, scaling, weight values) is still their own."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from punica_core import AdapterError
from punica_core.adapters import peft
from punica_core.adapters.peft import inspect_adapter, parse_adapter, read_raw_adapter
from punica_core.adapters.plan_memo import PlanMemo
from punica_core.model.config import ModelConfig

MAX_RANK = 64
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def cfg(default_dir) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((default_dir / "config.json").read_text()))


@pytest.fixture
def copies(parity_adapters, tmp_path):
    def make(n, **config_changes):
        out = []
        for i in range(n):
            dst = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
            shutil.copytree(parity_adapters["r8_all"], dst)
            if config_changes:
                path = dst / "adapter_config.json"
                c = json.loads(path.read_text())
                c.update(config_changes)
                path.write_text(json.dumps(c))
            out.append(dst)
        return out
    return make


@pytest.fixture
def checks(monkeypatch):
    """Counts the real (not memoized) header checks."""
    calls = []
    real = peft._check_plan

    def counted(*a, **k):
        calls.append(a[0])
        return real(*a, **k)
    monkeypatch.setattr(peft, "_check_plan", counted)
    monkeypatch.setattr(peft, "_PLANS", PlanMemo(size=8))
    return calls


def test_one_check_per_structure_each_adapter_keeps_its_name_and_folder(copies, cfg, checks):
    a_dir, b_dir = copies(2)
    a = parse_adapter("first", a_dir, cfg, MAX_RANK)
    plan_b = inspect_adapter("second", b_dir, cfg, MAX_RANK)    # header only: same key
    b = read_raw_adapter("third", b_dir, cfg, MAX_RANK)
    assert checks == ["first"]
    assert plan_b.name == "second" and plan_b.label == str(b_dir)
    assert (a.name, a.source, b.name, b.source) == ("first", str(a_dir), "third", str(b_dir))
    assert b.raw.where == f"{b_dir}/{WEIGHTS}"
    assert b.rank == a.rank and b.targets == a.targets


def test_scaling_settings_are_part_of_the_key(copies, cfg, checks):
    (base,), (double,), (rs,) = copies(1), copies(1, lora_alpha=32), copies(1, use_rslora=True)
    a = parse_adapter("a", base, cfg, MAX_RANK)
    b = parse_adapter("b", double, cfg, MAX_RANK)
    c = parse_adapter("c", rs, cfg, MAX_RANK)
    assert len(checks) == 3
    qb = [x.weights["q_proj"][1] for x in (a, b, c)]
    assert torch.allclose(qb[1], qb[0] * 2)                 # alpha 32 against 16, r = 8
    assert torch.allclose(qb[2], qb[0] * 8 ** 0.5)          # alpha / sqrt(r) against alpha / r
    assert not a.use_rslora and c.use_rslora


def test_other_config_fields_are_each_adapters_own(copies, cfg, checks):
    (x,), (y,) = copies(1, base_model_name_or_path="one/base"), \
        copies(1, base_model_name_or_path="other/base")
    px = inspect_adapter("x", x, cfg, MAX_RANK)
    py = inspect_adapter("y", y, cfg, MAX_RANK)
    assert len(checks) == 1
    assert (px.base_model, py.base_model) == ("one/base", "other/base")
    assert py.cfg["base_model_name_or_path"] == "other/base"


def test_a_bad_file_after_a_good_one_of_its_structure_is_still_refused(copies, cfg, checks):
    good, nan, short, renamed = copies(4)
    parse_adapter("good", good, cfg, MAX_RANK)
    # same header, a NaN in the values: the memo skips only the header check
    t = load_file(str(nan / WEIGHTS))
    key = next(k for k in t if "layers.1." in k and "v_proj.lora_A" in k)
    t[key][0, 0] = float("nan")
    save_file(t, str(nan / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="NaN or inf"):
        parse_adapter("nan", nan, cfg, MAX_RANK)
    # a truncated file: another size, so another key, and the full check refuses it
    data = (short / WEIGHTS).read_bytes()
    (short / WEIGHTS).write_bytes(data[:-64])
    with pytest.raises(AdapterError, match="does not match its header|truncated"):
        parse_adapter("short", short, cfg, MAX_RANK)
    # a header naming a tensor the model does not have: another digest, checked
    t = load_file(str(renamed / WEIGHTS))
    k = next(iter(t))
    t[k.replace("lora_A", "lora_C")] = t.pop(k)
    save_file(t, str(renamed / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="unexpected tensor"):
        parse_adapter("renamed", renamed, cfg, MAX_RANK)
    assert checks[0] == "good" and "short" in checks and "renamed" in checks


def test_memo_keeps_the_most_recent_structures():
    memo = PlanMemo(size=2)
    for k in ("a", "b"):
        memo.put((k,), k)
    assert memo.get(("a",)) == "a"      # a is now the most recent
    memo.put(("c",), "c")
    assert memo.get(("b",)) is None and memo.get(("a",)) == "a" and memo.get(("c",)) == "c"
    assert memo.get(None) is None and memo.hits == 3


def test_no_key_without_a_whole_header(cfg):
    assert PlanMemo.key(b"\x01", None, {}, cfg, MAX_RANK) is None
    assert PlanMemo.key((1000).to_bytes(8, "little") + b"{}", None, {}, cfg, MAX_RANK) is None
