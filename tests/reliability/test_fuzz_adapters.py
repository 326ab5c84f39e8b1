"""Fuzzed adapter loading: every malformed input ends in AdapterError with a message, never a
crash, a hang, a write outside the store, or a memory blow-up."""
import io
import json
import struct
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from punica_core import AdapterError
from punica_core.adapters.peft import parse_adapter
from punica_core.model.config import NAMED_SHAPES

CFG = NAMED_SHAPES["tiny"]          # small shapes keep each example cheap
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def good_files(rank=4):
    t = {}
    for layer in range(CFG.num_layers):
        for proj in ("q_proj", "v_proj"):
            fin, fout = CFG.proj_shapes[proj]
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            t[f"{p}.lora_A.weight"] = torch.randn(rank, fin)
            t[f"{p}.lora_B.weight"] = torch.randn(fout, rank)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return {"adapter_config.json": json.dumps(cfg).encode(),
            "adapter_model.safetensors": save(t)}


def load(files):
    return parse_adapter("fz", files, CFG, max_rank=64, max_bytes=4 << 20)


def test_the_unfuzzed_adapter_loads():
    assert load(good_files()).rank == 4


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c,
                                                                               max_size=3),
                           max_leaves=8)


@FUZZ
@given(key=st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "use_dora",
                            "modules_to_save", "use_rslora", "bias", "rank_pattern"]),
       value=json_values)
def test_malformed_config_values(key, value):
    files = good_files()
    cfg = json.loads(files["adapter_config.json"])
    cfg[key] = value
    files["adapter_config.json"] = json.dumps(cfg).encode()
    try:
        load(files)
    except AdapterError as e:
        assert str(e)


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_random_bytes_as_config_or_weights(blob):
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        files = good_files()
        files[name] = blob
        with pytest.raises(AdapterError):
            load(files)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(0, 255),
       at=st.integers(min_value=0, max_value=10_000))
def test_truncated_or_corrupted_safetensors(cut, flip, at):
    files = good_files()
    data = bytearray(files["adapter_model.safetensors"])
    if cut < len(data):
        data = data[:cut]
    elif at < len(data):
        data[at] ^= flip or 1
    files["adapter_model.safetensors"] = bytes(data)
    try:
        load(files)
    except AdapterError as e:
        assert str(e)


@FUZZ
@given(shape=st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=4),
       dtype=st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3"]))
def test_lying_headers_with_huge_shapes(shape, dtype):
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": dtype, "shape": shape, "data_offsets": [0, 16]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 16
    files = good_files()
    files["adapter_model.safetensors"] = blob
    with pytest.raises(AdapterError):
        load(files)


def test_nan_and_inf_weights_refused():
    for bad in (float("nan"), float("inf")):
        files = good_files()
        from safetensors.torch import load as st_load
        t = st_load(files["adapter_model.safetensors"])
        next(iter(t.values()))[0, 0] = bad
        files["adapter_model.safetensors"] = save(t)
        with pytest.raises(AdapterError, match="NaN or inf"):
            load(files)


def zip_of(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("case,match", [
    ("traversal", "unsafe path"), ("absolute", "unsafe path"), ("symlink", "symbolic link"),
    ("nested_zip", "nested archive"), ("too_many", "files in the archive"),
    ("deep", "nested too deep"), ("bomb", "over the"),
])
def test_hostile_archives(tmp_path, case, match):
    good = good_files()
    members = dict(good)
    symlink = None
    if case == "traversal":
        members = {"../../evil/adapter_config.json": b"{}", **good}
    elif case == "absolute":
        members = {"/tmp/adapter_config.json": b"{}"}
    elif case == "symlink":
        members, symlink = {}, "adapter_model.safetensors"
    elif case == "nested_zip":
        members = {"inner.zip": zip_of(good)}
    elif case == "too_many":
        members = {f"f{i}.txt": b"x" for i in range(100)}
    elif case == "deep":
        members = {f"a/b/{k}": v for k, v in good.items()}
    elif case == "bomb":      # 64 MiB of zeros compresses to ~64 KiB
        members = {"adapter_config.json": good["adapter_config.json"],
                   "adapter_model.safetensors": b"\0" * (64 << 20)}
    path = tmp_path / f"{case}.zip"
    path.write_bytes(zip_of(members, symlink))
    before = set(tmp_path.parent.rglob("*"))
    with pytest.raises(AdapterError, match=match):
        load({path.name: path.read_bytes()})
    assert set(tmp_path.parent.rglob("*")) == before       # nothing written anywhere
