"""Every adapter the engine cannot serve is refused with an AdapterError naming the cause."""
import json
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from punica_core import AdapterError
from punica_core.adapters.peft import parse_adapter, validate_name
from punica_core.model.config import NAMED_SHAPES, ModelConfig

MAX_RANK = 64


@pytest.fixture(scope="module")
def cfg(default_dir) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((default_dir / "config.json").read_text()))


@pytest.fixture
def good(parity_adapters, tmp_path):
    """A fresh copy of a valid rank-8 all-projection adapter to break."""
    dst = tmp_path / "good"
    shutil.copytree(parity_adapters["r8_all"], dst)
    return dst


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def refused(folder, cfg, match, max_rank=MAX_RANK):
    with pytest.raises(AdapterError, match=match) as e:
        parse_adapter("x", folder, cfg, max_rank)
    return str(e.value)


def test_good_adapter_loads_and_folds_scaling(good, cfg):
    a = parse_adapter("good", good, cfg, MAX_RANK)
    assert a.rank == 8 and len(a.targets) == 7
    from safetensors.torch import load_file
    raw = load_file(str(good / "adapter_model.safetensors"))
    b = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    scale = 16 / 8          # lora_alpha = 2r in tests/helpers.py
    assert torch.allclose(a.weights["q_proj"][1][0], b.t() * scale)


def test_rslora_scaling(parity_adapters, cfg):
    a = parse_adapter("rs", parity_adapters["r16_mlp_rs"], cfg, MAX_RANK)
    from safetensors.torch import load_file
    raw = load_file(str(parity_adapters["r16_mlp_rs"] / "adapter_model.safetensors"))
    b = raw["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
    assert torch.allclose(a.weights["down_proj"][1][2], b.t() * 32 / 16 ** 0.5)
    assert a.targets == ("gate_proj", "up_proj", "down_proj")


def test_dora_refused(good, cfg):
    edit_config(good, use_dora=True)
    refused(good, cfg, "DoRA")


def test_modules_to_save_refused(good, cfg):
    edit_config(good, modules_to_save=["lm_head"])
    refused(good, cfg, "modules_to_save")


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_embedding_and_lm_head_lora_refused(good, cfg, target):
    edit_config(good, target_modules=["q_proj", target])
    refused(good, cfg, "embeddings / lm_head")


def test_embedding_lora_tensors_refused(good, cfg):
    path = good / "adapter_model.safetensors"
    from safetensors.torch import load_file
    t = load_file(str(path))
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 49152)
    save_file(t, str(path))
    refused(good, cfg, "embeddings")


def test_unknown_target_module_refused(good, cfg):
    edit_config(good, target_modules=["q_proj", "fc1"])
    refused(good, cfg, "unknown target module 'fc1'")


def test_shape_mismatch_names_other_base_model(good, cfg):
    tiny = NAMED_SHAPES["tiny"]            # hidden 64 instead of 576
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.randn(8, tiny.hidden_size),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
               torch.randn(tiny.q_size, 8)}, str(good / "adapter_model.safetensors"))
    msg = refused(good, cfg, "another base model")
    assert "q_proj" in msg and "576" in msg


def test_pickled_bin_refused_and_never_unpickled(good, cfg, tmp_path):
    (good / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"x": Boom()}, good / "adapter_model.bin")
    refused(good, cfg, "pickled weights are never loaded")
    assert not marker.exists()


def test_rank_over_max_refused(parity_adapters, cfg):
    refused(parity_adapters["r64_attn"], cfg, "rank 64 is over the server's max rank 32",
            max_rank=32)


def test_nan_weights_refused(good, cfg):
    path = good / "adapter_model.safetensors"
    from safetensors.torch import load_file
    t = load_file(str(path))
    k = next(iter(t))
    t[k][0, 0] = float("nan")
    save_file(t, str(path))
    refused(good, cfg, "NaN or inf")


def test_missing_files_and_bad_json(good, cfg, tmp_path):
    refused(tmp_path / "nowhere", cfg, "no such adapter")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, cfg, "no adapter_config.json")
    (good / "adapter_config.json").write_text("{not json")
    refused(good, cfg, "not valid JSON")


def test_truncated_and_lying_safetensors(good, cfg):
    path = good / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(good, cfg, "truncated or corrupt|exceeds the file")
    path.write_bytes(b"\xff" * 8 + data[8:])
    refused(good, cfg, "header length")


def test_zip_adapters(good, cfg, tmp_path):
    ok = tmp_path / "ok.zip"
    with zipfile.ZipFile(ok, "w") as z:
        for f in good.iterdir():
            z.write(f, f"myadapter/{f.name}")
    assert parse_adapter("z", ok, cfg, MAX_RANK).rank == 8
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../adapter_config.json", "{}")
    refused(evil, cfg, "unsafe path")
    notzip = tmp_path / "notzip.zip"
    notzip.write_text("hello")
    refused(notzip, cfg, "not a valid .zip")


@pytest.mark.parametrize("name", ["", "../x", "a b", "x" * 65, "-start"])
def test_bad_adapter_names(name):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        validate_name(name)


def test_registry_refuses_duplicate_and_unknown(make_engine, parity_adapters):
    from punica_core import UnknownAdapterError
    e = make_engine()
    e.register_adapter("a", parity_adapters["r4_qv"])
    with pytest.raises(AdapterError, match="already registered"):
        e.register_adapter("a", parity_adapters["r8_all"])
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'b'"):
        e.unregister_adapter("b")
