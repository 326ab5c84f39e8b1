"""Lazy registration: config + safetensors header checked at once, weights read on first use."""
import json
import shutil

import pytest
import torch

from helpers import run_to_completion
from punica_core import AdapterError, SamplingParams
from punica_core.adapters.peft import CONFIG_NAME, WEIGHTS_NAME

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_lazy_adapter_is_not_read_until_used_and_then_matches_eager(make_engine,
                                                                    parity_adapters):
    path = parity_adapters["r8_all"]
    eager = make_engine()
    info_eager = eager.register_adapter("eager", path)
    want = eager.add_request("The sky is", GREEDY, "eager")
    run_to_completion(eager)

    e = make_engine()
    parses = e.store.parses
    info = e.register_adapter("lazy", path, lazy=True)
    assert e.store.parses == parses and not e.store.is_cached("lazy")
    assert e.adapter_location("lazy") == "disk"
    # what the header says is what parsing finds
    assert (info.rank, info.targets, info.use_rslora, info.base_model) == \
        (info_eager.rank, info_eager.targets, info_eager.use_rslora, info_eager.base_model)
    got = e.add_request("The sky is", GREEDY, "lazy")
    run_to_completion(e)
    assert e.store.parses == parses + 1 and e.store.is_cached("lazy")
    assert got.output_ids == want.output_ids
    # the background read's timeline (benchmarks report it): queued <= started <= done
    (queued, started, done), = e.store.read_times
    assert 0 < queued <= started <= done


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,match", [
    ("config", "target module"),
    ("header", "safetensors header"),
    ("truncated", "does not match its header"),
    ("rank", "rank 8 but the config says r=4"),
    ("not_a_folder", "needs an adapter folder"),
])
def test_lazy_registration_refuses_what_the_header_shows(make_engine, parity_adapters, tmp_path,
                                                         damage, match):
    path = _copy(parity_adapters["r8_all"], tmp_path / "a")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    weights = path / WEIGHTS_NAME
    if damage == "config":
        cfg["target_modules"] = ["q_proj", "not_a_module"]
        (path / CONFIG_NAME).write_text(json.dumps(cfg))
    elif damage == "header":
        weights.write_bytes(weights.read_bytes()[:8] + b"{not json" + weights.read_bytes()[17:])
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "rank":
        cfg["r"] = 4
        (path / CONFIG_NAME).write_text(json.dumps(cfg))
    elif damage == "not_a_folder":
        path = weights
    e = make_engine()
    with pytest.raises(AdapterError, match=match):
        e.register_adapter("bad", path, lazy=True)
    assert "bad" not in e.store


def test_bad_weight_values_fail_only_the_request_that_reads_them(make_engine, parity_adapters,
                                                                 tmp_path):
    from safetensors.torch import load_file, save_file
    path = _copy(parity_adapters["r4_qv"], tmp_path / "nan")
    tensors = load_file(str(path / WEIGHTS_NAME))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path / WEIGHTS_NAME))
    e = make_engine()
    e.register_adapter("nan", path, lazy=True)        # the header is fine
    e.register_adapter("good", parity_adapters["r8_all"], lazy=True)
    bad = e.add_request("Hi", GREEDY, "nan")
    good = e.add_request("Hi", GREEDY, "good")
    plain = e.add_request("Hi", GREEDY, None)
    run_to_completion(e)
    assert bad.finish_reason == "error" and "NaN or inf" in bad.error
    assert good.finish_reason == "length" and plain.finish_reason == "length"


def test_a_thousand_names_over_a_few_folders(make_engine, parity_adapters):
    """A large registry: registering reads no weights; only requested adapters are parsed, each
    once, although five adapters wait for two slots and a host cache of two (adapters read
    ahead stay cached until they reach a slot, and no more are read than the cache holds)."""
    folders = list(parity_adapters.values())
    e = make_engine(max_adapters_on_gpu=2, host_cache_adapters=2)
    parses = e.store.parses
    for i in range(1000):
        e.register_adapter(f"user-{i}", folders[i % len(folders)], lazy=True)
    assert e.store.parses == parses and len(e.store.names()) >= 1000
    reqs = [e.add_request("Hi", GREEDY, f"user-{i}") for i in (0, 1, 2, 3, 997)]
    run_to_completion(e)
    assert all(r.finish_reason == "length" for r in reqs)
    assert e.store.parses == parses + 5
    # user-0 and user-4 are the same folder: the same tokens
    again = e.add_request("Hi", GREEDY, "user-4")
    run_to_completion(e)
    assert again.output_ids == reqs[0].output_ids
    assert torch.is_tensor(e.store.get_cached("user-4").weights["q_proj"][0])
