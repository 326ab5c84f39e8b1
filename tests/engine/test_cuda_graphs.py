"""Decode steps replayed from CUDA graphs against the same engine run eagerly (device machine).

Both runs start from CPU-drawn weights; the graph run must actually replay graphs (checked),
with batches that shrink through several buckets (padding rows) and mix adapters."""
import pytest
import torch

from helpers import assert_logits_agree, outputs_with_logits, run_to_completion
from punica_core import Engine, EngineConfig, SamplingParams
from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter
from punica_core.model.config import NAMED_SHAPES
from punica_core.model.loader import load_model

pytestmark = pytest.mark.cuda
MIX = {"r4": (4, ["q_proj", "v_proj"]), "r8": (8, ALL_PROJECTIONS),
       "r16": (16, ["gate_proj", "up_proj", "down_proj"]), "r64": (64, ALL_PROJECTIONS)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_adapters")
    cfg = NAMED_SHAPES["tiny"]
    return {n: write_random_adapter(cfg, root / n, r, t, seed=i, b_scale=0.1)
            for i, (n, (r, t)) in enumerate(MIX.items())}


def run(adapters, graphs: bool, dtype=torch.bfloat16, n_requests=11, overlap=False):
    loaded = load_model("random:tiny", "cpu", torch.float32)
    loaded.model = loaded.model.to("cuda", dtype)
    e = Engine(EngineConfig(model="random:tiny", device="cuda", kv_cache_gb=0.05,
                            max_adapters_on_gpu=4, max_batch=16, cuda_graphs=graphs,
                            lora_overlap=overlap),
               loaded=loaded)
    for name, path in adapters.items():
        e.register_adapter(name, path)
    e.runner.capture = captured = []
    names = [*adapters, None]
    reqs = []
    for i in range(n_requests):
        # different lengths: the batch shrinks from 11 rows through buckets 8, 4, 2, 1
        params = SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True)
        reqs.append(e.add_request([5 + i, 17, 99, 1000 + 7 * i][: 2 + i % 3], params,
                                  names[i % len(names)]))
    run_to_completion(e)
    assert all(r.finish_reason == "length" for r in reqs), [r.error for r in reqs]
    return e, outputs_with_logits(reqs, captured)


def test_graph_replay_matches_eager_with_adapters(adapters):
    eager, ref = run(adapters, graphs=False)
    assert eager.runner.graphs is None
    engine, test = run(adapters, graphs=True)
    captured = engine.runner.graphs.captured
    buckets = {b for b, _ in captured}
    assert {(16, True), (8, True)} <= set(captured), captured
    assert {1, 2, 4} <= buckets, captured
    assert_logits_agree(ref, test, rel_tol=5e-2, tie_tol=0.25)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_lora_overlap_on_a_side_stream_matches(adapters, graphs):
    """lora_overlap: every site's LoRA on the side stream beside its base projection (captured
    into the graphs too) gives the logits of the plain order."""
    _, ref = run(adapters, graphs=False)
    engine, test = run(adapters, graphs=graphs, overlap=True)
    if graphs:
        assert (16, True) in engine.runner.graphs.captured
    assert_logits_agree(ref, test, rel_tol=5e-2, tie_tol=0.25)


def test_graph_replay_fp32_no_adapter_is_tight():
    """fp32 without adapters: the graph path (Triton attention) within 1e-4 of eager."""
    torch.backends.cuda.matmul.allow_tf32 = False
    _, ref = run({}, graphs=False, dtype=torch.float32, n_requests=6)
    engine, test = run({}, graphs=True, dtype=torch.float32, n_requests=6)
    assert engine.runner.graphs.captured
    assert_logits_agree(ref, test, rel_tol=1e-4, tie_tol=1e-3)


def test_graphs_are_off_without_cuda_graphs_flag_or_with_lora_off(adapters):
    loaded = load_model("random:tiny", "cpu", torch.float32)
    loaded.model = loaded.model.to("cuda", torch.bfloat16)
    e = Engine(EngineConfig(model="random:tiny", device="cuda", kv_cache_gb=0.05,
                            enable_lora=False), loaded=loaded)
    assert e.runner.graphs is not None and not e.runner.graphs.lora_ok
    with pytest.raises(Exception, match="LoRA switched off"):
        e.register_adapter("r4", adapters["r4"])
    out = e.add_request([5, 6, 7], SamplingParams(max_tokens=8, temperature=0,
                                                  ignore_eos=True))
    run_to_completion(e)
    assert len(out.output_ids) == 8 and e.runner.graphs.captured == [(1, False)]


def test_capture_while_another_thread_pins_memory_and_registers_adapters(adapters):
    """The loop captures its graphs while other threads go on: adapter loaders pin host
    memory, a user registers adapters. Neither the captures nor their calls may fail."""
    import threading
    loaded = load_model("random:tiny", "cpu", torch.float32)
    loaded.model = loaded.model.to("cuda", torch.bfloat16)
    e = Engine(EngineConfig(model="random:tiny", device="cuda", kv_cache_gb=0.05,
                            max_adapters_on_gpu=4, max_batch=16), loaded=loaded)
    stop, errors, pinned = threading.Event(), [], []

    def busy():
        try:
            i = 0
            while not stop.is_set():
                pinned.append(torch.empty(1 << (20 + i % 4), dtype=torch.uint8,
                                          pin_memory=True).fill_(1))
                for name, path in adapters.items():
                    e.register_adapter(f"{name}-{i}", path)
                i += 1
        except Exception as err:   # noqa: BLE001 - the assertion below reports it
            errors.append(err)
    t = threading.Thread(target=busy)
    t.start()
    try:
        n, _ = e.capture_graphs()
    finally:
        stop.set()
        t.join()
    assert not errors and pinned and n > 0
    # the graphs captured beside the thread serve as usual
    req = e.add_request([5, 17, 99], SamplingParams(max_tokens=6, temperature=0,
                                                    ignore_eos=True), "r8-0")
    run_to_completion(e)
    assert req.finish_reason == "length" and len(req.output_ids) == 6
