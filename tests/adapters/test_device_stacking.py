"""Device stacking (EngineConfig.adapter_device_stacking): an adapter kept as its file's bytes
(read_raw_adapter) and stacked into its slot by SlotPool gives the slot bit-identical weights
to a host-parsed one; NaN / inf fails the slot load with the host parse's message, naming the
layer; an overflowing sum of finite weights still loads. On the CPU here; on CUDA the same
code runs on the device (the CUDA test at the end)."""
import pytest
import torch

from punica_core.adapters.peft import parse_adapter, read_raw_adapter
from punica_core.adapters.slots import SlotPool
from test_stacking import CFG, DTYPES, key, make_adapter, same_bits


def load_both(folder, dtype, device="cpu"):
    pools = []
    for adapter in (parse_adapter("a", folder, CFG, 16, dtype=dtype),
                    read_raw_adapter("a", folder, CFG, 16)):
        pool = SlotPool(CFG, 2, 16, dtype, device)
        failures = []
        pool.on_failure = lambda name, msg: failures.append((name, msg))
        pool.load(read_raw_adapter("x", folder, CFG, 16))       # slot 0 holds something
        slot = pool.load(adapter)
        if device == "cuda":
            torch.cuda.synchronize()
        pools.append((pool, slot, pool.is_ready(slot), failures))
    return pools


@pytest.mark.parametrize("file_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_raw_slot_equals_parsed_slot(tmp_path, file_dtype, dtype):
    make_adapter(tmp_path / "a", file_dtype)
    raw = read_raw_adapter("a", tmp_path / "a", CFG, 16)
    assert raw.weights == {} and raw.rank_of("q_proj") == 8 and raw.rank_of("k_proj") == 0
    (parsed, s1, ok1, _), (stacked, s2, ok2, fails) = load_both(tmp_path / "a", dtype)
    assert ok1 and ok2 and not fails and s1 == s2 == 1
    for p in parsed.weights:
        wp, ws = parsed.weights[p], stacked.weights[p]
        assert wp.ranks_list == ws.ranks_list and torch.equal(wp.ranks, ws.ranks)
        assert same_bits(wp.a[1], ws.a[1]) and same_bits(wp.b[1], ws.b[1]), p


UNIFORM = {"q_proj": list(range(CFG.num_layers)), "down_proj": list(range(CFG.num_layers))}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_layer_one_rank_stacks_from_file_order_the_same(tmp_path, file_dtype, device):
    """Every layer at one rank (8, in slots of rank 16): each projection is one run in the
    file's order (layers 0, 1, 10, ... by key), gathered by layer into the slot; the same bits
    as the host parse, the padding rows zero."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": list(UNIFORM)}
    make_adapter(tmp_path / "a", file_dtype, config=config, layers_of=UNIFORM,
                 alpha_of=lambda *_: (8, 16))
    (parsed, s1, ok1, _), (stacked, s2, ok2, fails) = load_both(tmp_path / "a", torch.bfloat16,
                                                                 device)
    assert ok1 and ok2 and not fails
    for p in UNIFORM:
        wp, ws = parsed.weights[p], stacked.weights[p]
        assert ws.ranks_list[s2] == 8
        assert same_bits(wp.a[s1], ws.a[s2]) and same_bits(wp.b[s1], ws.b[s2]), p
        assert not ws.a[s2, :, 8:].any() and not ws.b[s2, :, 8:].any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_fails_the_slot_load_naming_the_layer(tmp_path, bad, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tensors = make_adapter(tmp_path / "a", torch.bfloat16)
    tensors[key(4, "v_proj", "B")][3, 1] = bad
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    pool = SlotPool(CFG, 1, 16, torch.bfloat16, device)
    failures = []
    pool.on_failure = lambda name, msg: failures.append((name, msg))
    slot = pool.load(read_raw_adapter("a", tmp_path / "a", CFG, 16))
    if device == "cuda":
        torch.cuda.synchronize()
    assert not pool.is_ready(slot)
    assert failures and failures[0][0] == "a" and "layer 4 v_proj" in failures[0][1] \
        and "NaN or inf" in failures[0][1]
    assert pool.lookup("a") is None and pool.snapshot()["resident"] == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_overflowing_norm_of_finite_weights_still_loads(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tensors = make_adapter(tmp_path / "a", torch.float32)
    tensors[key(0, "q_proj", "A")][:, :4] = 3e38        # finite; their fp32 sum is inf
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    pool = SlotPool(CFG, 1, 16, torch.float32, device)
    pool.on_failure = lambda name, msg: pytest.fail(msg)
    slot = pool.load(read_raw_adapter("a", tmp_path / "a", CFG, 16))
    if device == "cuda":
        torch.cuda.synchronize()
    assert pool.is_ready(slot) and pool.weights["q_proj"].a[slot, 0, 0, 0] == 3e38


def test_large_finite_fp16_weights_load_without_the_exact_check(tmp_path, monkeypatch):
    """The quick finiteness test is taken in float32: fp16 weights whose norm passes fp16's
    range (65504) are not sent to the slow per-layer check."""
    tensors = make_adapter(tmp_path / "a", torch.float16)
    tensors[key(0, "q_proj", "A")][:, :2] = 60000.0       # finite; their fp16 norm is inf
    from safetensors.torch import save_file
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    pool = SlotPool(CFG, 1, 16, torch.float16, "cpu")
    checked = []
    monkeypatch.setattr(pool, "_verify", lambda slot: checked.append(slot) or True)
    slot = pool.load(read_raw_adapter("a", tmp_path / "a", CFG, 16))
    assert pool.is_ready(slot) and checked == []
    assert pool.weights["q_proj"].a[slot, 0, 0, 0] == 60000.0


def test_engine_with_device_stacking_serves_the_same_tokens(make_engine, parity_adapters):
    """Lazily registered adapters (read in the background as file bytes, stacked at slot
    load) give the greedy tokens of host-parsed ones, with fewer slots than adapters."""
    from helpers import run_to_completion
    from punica_core import SamplingParams
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = []
    for stacking in (False, True):
        e = make_engine(adapter_device_stacking=stacking, max_adapters_on_gpu=2)
        for name, path in parity_adapters.items():
            e.register_adapter(name, path, lazy=True)
        reqs = [e.add_request("Once upon a time", params, a) for a in [*parity_adapters, None]]
        run_to_completion(e)
        assert all(r.finish_reason == "length" for r in reqs), [r.error for r in reqs]
        outs.append([r.output_ids for r in reqs])
        if stacking:
            assert all(ad.raw is not None for ad in e.store._cache.values())
    assert outs[0] == outs[1]


def test_engine_fails_only_the_bad_adapters_request(make_engine, parity_adapters, tmp_path):
    from helpers import run_to_completion
    from punica_core import SamplingParams
    from safetensors.torch import load_file, save_file
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(parity_adapters["r8_all"], bad)
    w = load_file(str(bad / "adapter_model.safetensors"))
    k = next(k for k in sorted(w) if ".layers.1." in k and "o_proj.lora_A" in k)
    w[k][0, 0] = float("nan")
    save_file(w, str(bad / "adapter_model.safetensors"))
    e = make_engine(adapter_device_stacking=True)
    e.register_adapter("bad", bad, lazy=True)
    e.register_adapter("good", parity_adapters["r4_qv"], lazy=True)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    rb, rg = e.add_request("Hi", params, "bad"), e.add_request("Hi", params, "good")
    run_to_completion(e)
    assert rg.finish_reason == "length" and len(rg.output_ids) == 6
    assert rb.finish_reason == "error" and "layer 1 o_proj" in rb.error, rb.error
    again = e.add_request("Hi", params, "bad")
    run_to_completion(e)
    assert again.finish_reason == "error"


@pytest.mark.cuda
@pytest.mark.parametrize("file_dtype", DTYPES, ids=str)
def test_raw_slot_equals_parsed_slot_cuda(tmp_path, file_dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    make_adapter(tmp_path / "a", file_dtype)
    (parsed, s1, ok1, _), (stacked, s2, ok2, fails) = load_both(tmp_path / "a", torch.bfloat16,
                                                                 "cuda")
    assert ok1 and ok2 and not fails
    for p in parsed.weights:
        assert torch.equal(parsed.weights[p].a[s1], stacked.weights[p].a[s2])
        assert torch.equal(parsed.weights[p].b[s1], stacked.weights[p].b[s2])


def test_unaligned_tensors_in_the_file_stack_the_same(tmp_path):
    """A header whose length leaves the data at an odd address (other writers than
    safetensors' own pad it): TensorRef.view makes aligned copies, which stack per layer."""
    import json
    import struct
    make_adapter(tmp_path / "a", torch.bfloat16)
    path = tmp_path / "a" / "adapter_model.safetensors"
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n]).copy()
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8 + 1)           # odd: every tensor starts unaligned
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])
    (parsed, s1, ok1, _), (stacked, s2, ok2, fails) = load_both(tmp_path / "a", torch.bfloat16)
    assert ok1 and ok2 and not fails
    for p in parsed.weights:
        assert same_bits(parsed.weights[p].a[s1], stacked.weights[p].a[s2]), p
        assert same_bits(parsed.weights[p].b[s1], stacked.weights[p].b[s2]), p


@pytest.mark.cuda
def test_slot_loads_record_when_they_were_issued_and_seen_ready(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    make_adapter(tmp_path / "a", torch.bfloat16)
    pool = SlotPool(CFG, 2, 16, torch.bfloat16, "cuda")
    slot = pool.load(read_raw_adapter("a", tmp_path / "a", CFG, 16))
    torch.cuda.synchronize()
    assert pool.is_ready(slot)
    (issued, ready), = pool.load_times
    assert 0 < issued <= ready


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_device_ranks_follow_each_load_and_eviction_of_a_reused_slot(tmp_path, device):
    """A slot's ranks for all projections are set by one copy per load and one zero_ per
    eviction (SlotPool._ranks): the device values match ranks_list after each."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    make_adapter(tmp_path / "a", torch.bfloat16)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": list(UNIFORM)}
    make_adapter(tmp_path / "u", torch.bfloat16, config=config, layers_of=UNIFORM,
                 alpha_of=lambda *_: (8, 16))
    pool = SlotPool(CFG, 1, 16, torch.bfloat16, device)

    def device_ranks():
        if device == "cuda":
            torch.cuda.synchronize()
        return {p: (w.ranks.tolist(), w.ranks_list) for p, w in pool.weights.items()}
    seen = []
    for name in ("a", "u"):
        adapter = read_raw_adapter(name, tmp_path / name, CFG, 16)
        assert pool.load(adapter) == 0
        got = device_ranks()
        assert all(on_device == host == [adapter.rank_of(p)] for p, (on_device, host)
                   in got.items()), got
        seen.append({p: adapter.rank_of(p) for p in got})
    assert seen[0] != seen[1] and seen[1]["k_proj"] == 0 and seen[1]["down_proj"] == 8
    pool.evict("u")
    assert all(v == ([0], [0]) for v in device_ranks().values())
