"""The engine on CUDA against the reference paths (run on the device machine)."""
import pytest
import torch

from helpers import run_to_completion
from punica_core import Engine, EngineConfig, SamplingParams
from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter
from punica_core.model.config import NAMED_SHAPES
from punica_core.model.loader import load_model

pytestmark = pytest.mark.cuda
MIX = {"r4": (4, ["q_proj", "v_proj"]), "r8": (8, ALL_PROJECTIONS),
       "r16": (16, ["gate_proj", "up_proj", "down_proj"]), "r64": (64, ALL_PROJECTIONS)}


def run(device, dtype, adapters, monkeypatch=None, backend=None):
    if backend:
        monkeypatch.setenv("PUNICA_BACKEND", backend)
    from punica_core.ops.backend import cuda_ops
    cuda_ops.cache_clear()
    loaded = load_model("random:tiny", device, dtype)
    e = Engine(EngineConfig(model="random:tiny", device=device, kv_cache_gb=0.05,
                            max_adapters_on_gpu=4), loaded=loaded)
    for name, path in adapters.items():
        e.register_adapter(name, path)
    e.runner.capture = captured = []
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reqs = [e.add_request([5 + i, 17, 99, 1000 + i], params, a)
            for i, a in enumerate([*adapters, None])]
    run_to_completion(e)
    return [r.output_ids for r in reqs], captured


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_adapters")
    cfg = NAMED_SHAPES["tiny"]
    return {n: write_random_adapter(cfg, root / n, r, t, seed=i, b_scale=0.5)
            for i, (n, (r, t)) in enumerate(MIX.items())}


def test_cuda_fp32_matches_cpu(adapters):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_tokens, _ = run("cpu", torch.float32, adapters)
    gpu_tokens, _ = run("cuda", torch.float32, adapters)
    assert gpu_tokens == cpu_tokens


def test_cuda_kernels_match_torch_backend_bf16(adapters, monkeypatch):
    ref_tokens, ref_logits = run("cuda", torch.bfloat16, adapters, monkeypatch, "torch")
    tokens, logits = run("cuda", torch.bfloat16, adapters, monkeypatch, "auto")
    first_ref, first = ref_logits[0][1], logits[0][1]
    err = (first - first_ref).norm() / first_ref.norm()
    assert err < 2e-2, f"relative logit error {err}"
    agree = sum(a == b for ra, rb in zip(ref_tokens, tokens) for a, b in zip(ra, rb))
    assert agree >= 0.9 * sum(len(r) for r in ref_tokens)
