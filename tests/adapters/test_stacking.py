"""parse_adapter's stacked weights are bit-identical to the straightforward computation
(A = a in the target dtype, B = b.t() * scale computed in float32 and rounded once, zero where
the adapter has no layer or a lower rank), for every file / target dtype pair; NaN / inf is
refused naming the layer and projection."""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from punica_core import AdapterError
from punica_core.adapters import stacking
from punica_core.adapters.peft import ReadBuffers, parse_adapter
from punica_core.model.config import NAMED_SHAPES

CFG = dataclasses.replace(NAMED_SHAPES["tiny"], num_layers=6)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LAYERS = {"q_proj": [0, 1, 2, 3, 4, 5], "v_proj": [1, 2, 4], "down_proj": [5]}
RANK, ALPHA = 8, 16
# layer 2's q_proj has rank 4 and alpha 3; every down_proj alpha 5 (per-layer scales)
CONFIG = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA,
          "target_modules": list(LAYERS), "rank_pattern": {"layers.2.self_attn.q_proj": 4},
          "alpha_pattern": {"layers.2.self_attn.q_proj": 3, "down_proj": 5}}


def key(layer, proj, ab):
    kind = "mlp" if proj == "down_proj" else "self_attn"
    return f"base_model.model.model.layers.{layer}.{kind}.{proj}.lora_{ab}.weight"


def rank_alpha(layer, proj):
    if (layer, proj) == (2, "q_proj"):
        return 4, 3
    return RANK, 5 if proj == "down_proj" else ALPHA


def make_adapter(folder, file_dtype, seed=0, config=CONFIG, layers_of=LAYERS, cfg=CFG,
                 alpha_of=rank_alpha):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for proj, layers in layers_of.items():
        fin, fout = cfg.proj_shapes[proj]
        for layer in layers:
            r, _ = alpha_of(layer, proj)
            tensors[key(layer, proj, "A")] = torch.randn(r, fin, generator=g).to(file_dtype)
            tensors[key(layer, proj, "B")] = (torch.randn(fout, r, generator=g)
                                              * 0.1).to(file_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def reference(tensors, proj, dtype, rslora=False, layers_of=LAYERS, cfg=CFG,
              alpha_of=rank_alpha):
    """The straightforward stacking, one layer at a time from zeros."""
    fin, fout = cfg.proj_shapes[proj]
    A = torch.zeros(cfg.num_layers, RANK, fin, dtype=dtype)
    B = torch.zeros(cfg.num_layers, RANK, fout, dtype=dtype)
    for layer in layers_of[proj]:
        r, alpha = alpha_of(layer, proj)
        scale = alpha / (math.sqrt(r) if rslora else r)
        A[layer, :r] = tensors[key(layer, proj, "A")].to(dtype)
        B[layer, :r] = (tensors[key(layer, proj, "B")].float().t() * scale).to(dtype)
    return A, B


def same_bits(x, y):
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(
        x.view(torch.int16 if x.itemsize == 2 else torch.int32),
        y.view(torch.int16 if y.itemsize == 2 else torch.int32))


@pytest.mark.parametrize("file_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stacked_weights_bit_identical_to_reference(tmp_path, file_dtype, dtype):
    tensors = make_adapter(tmp_path / "a", file_dtype)
    ad = parse_adapter("a", tmp_path / "a", CFG, 16, dtype=dtype, buffers=ReadBuffers())
    assert ad.targets == ("q_proj", "v_proj", "down_proj") and ad.rank == RANK
    for proj in LAYERS:
        A, B = ad.weights[proj]
        ref_a, ref_b = reference(tensors, proj, dtype)
        assert same_bits(A, ref_a), proj
        assert same_bits(B, ref_b), proj
    assert not ad.weights["v_proj"][0][[0, 3, 5]].any()         # untouched layers are zero
    assert not ad.weights["q_proj"][1][2, 4:].any()             # rank 4 of 8: padding rows


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_runs_of_layers_copied_at_once_match_reference(tmp_path, file_dtype, monkeypatch):
    """12 layers sort as 0, 1, 10, 11, 2, ... in the file, all at one stride: down_proj is
    gathered from one strided view in file order; q_proj (layer 7 has its own scale) is
    copied in runs of consecutive layers at one stride (layers 2-6, 7, 8-9 among them)."""
    cfg = dataclasses.replace(CFG, num_layers=12)
    layers_of = {"q_proj": list(range(12)), "down_proj": list(range(12))}
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA,
              "target_modules": list(layers_of),
              "alpha_pattern": {"layers.7.self_attn.q_proj": 3}}

    def alpha_of(layer, proj):
        return RANK, 3 if (layer, proj) == (7, "q_proj") else ALPHA
    tensors = make_adapter(tmp_path / "a", file_dtype, config=config, layers_of=layers_of,
                           cfg=cfg, alpha_of=alpha_of)
    runs, file_runs = [], []
    real_runs, real_file_run = stacking._layer_runs, stacking._stack_file_run

    def recorded(items):
        runs.append([[layer for layer, *_ in run] for run in real_runs(items)])
        return real_runs(items)

    def recorded_file_run(A, B, run, blob):
        file_runs.append([layer for layer, *_ in run])
        return real_file_run(A, B, run, blob)
    monkeypatch.setattr(stacking, "_layer_runs", recorded)
    monkeypatch.setattr(stacking, "_stack_file_run", recorded_file_run)
    ad = parse_adapter("a", tmp_path / "a", cfg, 16, dtype=torch.bfloat16)
    assert file_runs == [[0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]]                  # down
    assert [[r for r in proj_runs if 2 <= r[0] <= 9] for proj_runs in runs] \
        == [[list(range(2, 7)), [7], [8, 9]]]                                     # q
    for proj in layers_of:
        ref = reference(tensors, proj, torch.bfloat16, layers_of=layers_of, cfg=cfg,
                        alpha_of=alpha_of)
        assert same_bits(ad.weights[proj][0], ref[0]) and same_bits(ad.weights[proj][1], ref[1])


def test_rslora_scales(tmp_path):
    tensors = make_adapter(tmp_path / "a", torch.bfloat16, config={**CONFIG, "use_rslora": True})
    ad = parse_adapter("a", tmp_path / "a", CFG, 16, dtype=torch.bfloat16)
    for proj in LAYERS:
        assert same_bits(ad.weights[proj][1], reference(tensors, proj, torch.bfloat16, True)[1])


def test_reused_read_buffer_gives_the_same_weights(tmp_path):
    bufs = ReadBuffers()
    first = make_adapter(tmp_path / "a", torch.bfloat16, seed=1)
    make_adapter(tmp_path / "b", torch.bfloat16, seed=2)
    a = parse_adapter("a", tmp_path / "a", CFG, 16, dtype=torch.bfloat16, buffers=bufs)
    parse_adapter("b", tmp_path / "b", CFG, 16, dtype=torch.bfloat16, buffers=bufs)
    assert bufs.kept_bytes() > 0
    # a's weights are copies: reading b into the same buffer left them as they were
    assert same_bits(a.weights["q_proj"][0], reference(first, "q_proj", torch.bfloat16)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("proj,layer,ab", [("q_proj", 3, "A"), ("v_proj", 4, "B"),
                                           ("down_proj", 5, "B"), ("q_proj", 2, "B")])
def test_non_finite_weights_name_layer_and_projection(tmp_path, proj, layer, ab, bad):
    tensors = make_adapter(tmp_path / "a", torch.bfloat16)
    t = tensors[key(layer, proj, ab)]
    t[-1, -1] = bad
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=rf"layer {layer} {proj}: weights contain NaN or inf"):
        parse_adapter("a", tmp_path / "a", CFG, 16, dtype=torch.bfloat16)


def test_overflow_on_conversion_is_refused(tmp_path):
    tensors = make_adapter(tmp_path / "a", torch.float32)
    tensors[key(4, "v_proj", "A")][0, 0] = 1e6          # finite in fp32, inf in fp16
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    parse_adapter("a", tmp_path / "a", CFG, 16, dtype=torch.float32)
    with pytest.raises(AdapterError, match="layer 4 v_proj: weights contain NaN or inf"):
        parse_adapter("a", tmp_path / "a", CFG, 16, dtype=torch.float16)


def test_huge_finite_weights_load(tmp_path):
    """Their sum overflows (the fast check fails), yet every element is finite."""
    tensors = make_adapter(tmp_path / "a", torch.float32)
    tensors[key(1, "q_proj", "A")].fill_(3e38)
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    ad = parse_adapter("a", tmp_path / "a", CFG, 16, dtype=torch.float32)
    assert ad.weights["q_proj"][0][1, 0, 0] == torch.tensor(3e38)


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """Counts the torch functions called (each one hands the GIL over once more)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") != "__get__":      # attribute reads: no hand-over
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_parse_calls_do_not_grow_with_the_layers(tmp_path, file_dtype):
    """Beside a busy engine loop each torch call of a parse waits up to Python's switch
    interval for the GIL: a PEFT file (its layers sorted 0, 1, 10, ... by key) of every
    projection parses with the same number of calls for 12 layers as for 40, a handful per
    projection (the one-run-per-layer-block copy took 7 runs x 5 calls on 32 layers)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    counts = []
    for layers in (12, 40):
        cfg = dataclasses.replace(CFG, num_layers=layers)
        layers_of = {p: list(range(layers)) for p in targets}
        config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": targets}
        tensors = make_adapter(tmp_path / str(layers), file_dtype, config=config,
                               layers_of=layers_of, cfg=cfg, alpha_of=lambda *_: (RANK, ALPHA))
        with _TorchCalls() as mode:
            ad = parse_adapter("a", tmp_path / str(layers), cfg, 16, dtype=torch.bfloat16)
        counts.append(mode.calls)
        for proj in targets:
            ref = reference(tensors, proj, torch.bfloat16, layers_of=layers_of, cfg=cfg,
                            alpha_of=lambda *_: (RANK, ALPHA))
            assert same_bits(ad.weights[proj][0], ref[0]) and same_bits(ad.weights[proj][1],
                                                                        ref[1])
    assert counts[0] == counts[1] <= 14 * len(targets), counts


def test_device_orders_are_made_once_each_and_right_past_the_staging_rows():
    from punica_core.adapters.stacking import DeviceOrders
    orders = DeviceOrders(torch.device("cpu"), num_layers=4, rows=2)
    first = orders.get([0, 1, 3, 2])
    assert orders.get([0, 1, 3, 2]) is first            # one tensor per order
    wanted = [[0, 1, 3, 2], [3, 2, 1, 0], [1, 0, 2, 3], [2, 0]]     # past the 2 rows; odd size
    got = [orders.get(w) for w in wanted]
    assert [g.tolist() for g in got] == wanted          # a later order rewrote no earlier one
    assert all(g.dtype == torch.int64 for g in got)
