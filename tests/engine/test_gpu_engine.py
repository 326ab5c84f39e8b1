"""The engine on CUDA against the reference paths (run on the device machine).

Random weights make greedy sequences fragile (one flip at a near-tie and they part ways), so
the check is: logits agree at every step while both runs have seen the same tokens, and where
the tokens part, the reference's top two logits were a near-tie."""
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
NEW = 24


def run(device, dtype, adapters, monkeypatch=None, backend=None, stagger=False,
        cuda_graphs=False, engines=None, capture_first=False):
    """Greedy tokens and per-step logits of one mixed batch, per request in submit order.
    stagger: half the requests start 3 steps late with 24-token prompts, so those steps
    prefill a long chunk beside decode rows (continuous batching: on CUDA the decode rows'
    attention runs the paged kernel and the LoRA the tensor-core pair)."""
    if backend:
        monkeypatch.setenv("PUNICA_BACKEND", backend)
    from punica_core.ops.backend import cuda_ops
    cuda_ops.cache_clear()
    # weights drawn on the CPU (a CUDA generator draws other numbers for the same seed)
    loaded = load_model("random:tiny", "cpu", torch.float32)
    loaded.model = loaded.model.to(device, dtype)
    # eager by default: this compares the SGMV kernels with the torch backend; graph
    # replay against eager is tests/engine/test_cuda_graphs.py
    e = Engine(EngineConfig(model="random:tiny", device=device, kv_cache_gb=0.05,
                            max_adapters_on_gpu=4, cuda_graphs=cuda_graphs), loaded=loaded)
    if engines is not None:
        engines.append(e)
    for name, path in adapters.items():
        e.register_adapter(name, path)
    if capture_first:
        e.capture_graphs()
    e.runner.capture = captured = []
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    names = [*adapters, None]
    if not stagger:
        reqs = [e.add_request([5 + i, 17, 99, 1000 + i], params, a) for i, a in enumerate(names)]
    else:
        reqs = [e.add_request([5 + i, 17, 99, 1000 + i], params, a)
                for i, a in enumerate(names[::2])]
        for _ in range(3):
            e.step()
        reqs += [e.add_request([7 + i] + list(range(300, 323)), params, a)
                 for i, a in enumerate(names[1::2])]
    run_to_completion(e)
    return outputs_with_logits(reqs, captured)


def off_then_on(monkeypatch, module, flag: str, adapters, **kw):
    """run() in bf16 with staggered requests, module.flag off (the reference), then on."""
    out = []
    for value in (False, True):
        monkeypatch.setattr(module, flag, value)
        out.append(run("cuda", torch.bfloat16, adapters, stagger=True, **kw))
    return out


def agree(ref, test, rel_tol, tie_tol):
    assert all(len(ids) == NEW for ids, _ in ref + test)
    assert_logits_agree(ref, test, rel_tol, tie_tol)


def make_adapters(root, b_scale):
    cfg = NAMED_SHAPES["tiny"]
    return {n: write_random_adapter(cfg, root / n, r, t, seed=i, b_scale=b_scale)
            for i, (n, (r, t)) in enumerate(MIX.items())}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Strong adapters: in fp32 any path difference shows at once."""
    return make_adapters(tmp_path_factory.mktemp("gpu_adapters"), b_scale=0.5)


@pytest.fixture(scope="module")
def moderate_adapters(tmp_path_factory):
    """bf16 rounding compounds chaotically under LoRA that dominates a random model; adapters
    of a realistic strength keep the two bf16 paths comparable over many steps."""
    return make_adapters(tmp_path_factory.mktemp("gpu_adapters_bf16"), b_scale=0.1)


def test_cuda_fp32_matches_cpu(adapters):
    torch.backends.cuda.matmul.allow_tf32 = False
    agree(run("cpu", torch.float32, adapters), run("cuda", torch.float32, adapters),
          rel_tol=1e-4, tie_tol=1e-3)


def test_cuda_kernels_match_torch_backend_bf16(moderate_adapters, monkeypatch):
    # the SGMV kernels against the torch LoRA path, everything else equal: both runs keep the
    # reference attention (with the paged kernel in both, the 24-step bf16 drift reached 5.4%
    # at the last step on an H200, against 5%; that kernel is compared with the reference in
    # test_prefill_beside_decode_rows_paged_attention_matches_reference_bf16)
    from punica_core.model import llama
    monkeypatch.setattr(llama, "MIXED_STEP_PAGED_DECODE", False)
    ref = run("cuda", torch.bfloat16, moderate_adapters, monkeypatch, "torch")
    test = run("cuda", torch.bfloat16, moderate_adapters, monkeypatch, "auto")
    agree(ref, test, rel_tol=5e-2, tie_tol=0.25)


def test_prefill_beside_decode_rows_paged_attention_matches_reference_bf16(moderate_adapters,
                                                                          monkeypatch):
    """Eager bf16 steps run their decode rows' attention in the paged Triton kernel; the
    reference (gather + SDPA) gives the same logits within bf16's noise."""
    from punica_core.model import llama
    agree(*off_then_on(monkeypatch, llama, "MIXED_STEP_PAGED_DECODE", moderate_adapters),
          rel_tol=5e-2, tie_tol=0.25)


def test_paged_prefill_kernel_matches_reference_attention_bf16(moderate_adapters, monkeypatch):
    """llama.MIXED_STEP_PAGED_PREFILL: eager steps run their prefill chunks (and decode rows)
    in the paged Triton kernels; the same logits within bf16's noise as the reference
    attention's gather + SDPA per chunk, with prompts prefilled beside running requests."""
    from punica_core.model import llama
    agree(*off_then_on(monkeypatch, llama, "MIXED_STEP_PAGED_PREFILL", moderate_adapters),
          rel_tol=5e-2, tie_tol=0.25)


def test_mixed_step_graphs_match_eager_steps_bf16(moderate_adapters, monkeypatch):
    """engine/mixed_graphs.MIXED_GRAPHS: steps that prefill beside decode rows replayed from
    captured graphs (padded buckets, paged Triton attention, the pair LoRA kernels) give the
    eager steps' logits within bf16's noise; both runs replay decode-only steps."""
    from punica_core.engine import mixed_graphs
    engines = []
    ref, test = off_then_on(monkeypatch, mixed_graphs, "MIXED_GRAPHS", moderate_adapters,
                            cuda_graphs=True, engines=engines)
    assert not engines[0].runner.mixed_graphs.captured
    assert engines[1].runner.mixed_graphs.captured      # the prefill steps did replay
    agree(ref, test, rel_tol=5e-2, tie_tol=0.25)


def test_graphs_captured_up_front_match_graphs_captured_on_first_use(moderate_adapters):
    """Engine.capture_graphs captures every bucket over padding inputs before serving: no step
    captures afterwards, and the tokens and logits are those of graphs captured lazily over a
    real step's inputs."""
    engines = []
    lazy = run("cuda", torch.bfloat16, moderate_adapters, stagger=True, cuda_graphs=True,
               engines=engines)
    first = run("cuda", torch.bfloat16, moderate_adapters, stagger=True, cuda_graphs=True,
                engines=engines, capture_first=True)
    lazy_e, first_e = engines
    decode, mixed = first_e.runner.graphs, first_e.runner.mixed_graphs
    assert len(decode.captured) == 2 * len(decode.buckets)
    assert len(mixed.captured) == 2 * sum(c <= r for r in mixed.row_buckets
                                          for c in mixed.chunk_buckets)
    assert set(lazy_e.runner.graphs.captured) < set(decode.captured)
    assert set(lazy_e.runner.mixed_graphs.captured) < set(mixed.captured)
    assert first_e.capture_graphs()[0] == 0         # nothing left to capture
    assert [ids for ids, _ in first] == [ids for ids, _ in lazy]
    agree(lazy, first, rel_tol=1e-3, tie_tol=1e-3)


def test_prefill_beside_decode_rows_fp32_matches_cpu(adapters):
    torch.backends.cuda.matmul.allow_tf32 = False
    agree(run("cpu", torch.float32, adapters, stagger=True),
          run("cuda", torch.float32, adapters, stagger=True), rel_tol=1e-4, tie_tol=1e-3)


def test_prefill_beside_decode_rows_kernels_match_torch_backend_bf16(moderate_adapters,
                                                                     monkeypatch):
    ref = run("cuda", torch.bfloat16, moderate_adapters, monkeypatch, "torch", stagger=True)
    test = run("cuda", torch.bfloat16, moderate_adapters, monkeypatch, "auto", stagger=True)
    agree(ref, test, rel_tol=5e-2, tie_tol=0.25)


def test_shadow_loads_ask_whether_the_step_is_done(moderate_adapters, monkeypatch):
    """scheduler.STOP_LOADS_WHEN_STEP_DONE on CUDA: in a step's shadow load_ahead asks the
    runner's probe (a CUDA event recorded at the first ask) before a second slot load, and
    every request still completes with its adapter."""
    from punica_core.engine import scheduler
    monkeypatch.setattr(scheduler, "STOP_LOADS_WHEN_STEP_DONE", True)
    loaded = load_model("random:tiny", "cpu", torch.float32)
    loaded.model = loaded.model.to("cuda", torch.bfloat16)
    e = Engine(EngineConfig(model="random:tiny", device="cuda", kv_cache_gb=0.05,
                            max_adapters_on_gpu=8, max_batch=2), loaded=loaded)
    folders = list(moderate_adapters.values())
    names = [f"a{i}" for i in range(6)]
    for i, name in enumerate(names):
        e.register_adapter(name, folders[i % len(folders)])
    asked, probe = [], e.runner._step_done_probe

    def spy():
        done = probe()
        assert done is not None             # on CUDA the runner hands a probe

        def ask():
            asked.append(done())
            return asked[-1]
        return ask
    monkeypatch.setattr(e.runner, "_step_done_probe", spy)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    reqs = [e.add_request([5, 17, 99, 1000 + i], params, n) for i, n in enumerate(names)]
    try:
        run_to_completion(e)
    finally:
        e.close()
    assert all(len(r.output_ids) == 8 for r in reqs)
    assert asked, "no shadow call issued a second slot load"
