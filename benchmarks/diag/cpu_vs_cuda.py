"""Diagnostic: where do CPU and CUDA fp32 paths part? (no adapters, then attention alone)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
torch.backends.cuda.matmul.allow_tf32 = False
from punica_core import Engine, EngineConfig, SamplingParams  # noqa: E402
from punica_core.engine.layout import ScheduledChunk, build_layout  # noqa: E402
from punica_core.model.attention import paged_attention_ref  # noqa: E402
from punica_core.model.loader import load_model  # noqa: E402


def logits_of(device, prompts):
    loaded = load_model("random:tiny", "cpu", torch.float32)
    loaded.model = loaded.model.to(device, torch.float32)
    e = Engine(EngineConfig(model="random:tiny", device=device, kv_cache_gb=0.01),
               loaded=loaded)
    e.runner.capture = cap = []
    for p in prompts:
        e.add_request(p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    while e.has_work():
        e.step()
    return [c[1] for c in cap]


for prompts in ([[5, 17, 99, 1000]], [[5, 17, 99, 1000], [7, 8, 9, 10, 11]]):
    a, b = logits_of("cpu", prompts), logits_of("cuda", prompts)
    for step, (x, y) in enumerate(zip(a, b)):
        print(len(prompts), "requests, step", step, "rel err",
              ((x - y).norm() / x.norm()).item())

# attention alone on identical inputs
g = torch.Generator().manual_seed(0)
q = torch.randn(9, 4, 16, generator=g)
kc = torch.randn(64, 2, 16, generator=g)
vc = torch.randn(64, 2, 16, generator=g)
chunks = [ScheduledChunk([1, 2, 3, 4], 0, [0], -1, True),
          ScheduledChunk([5], 6, [1], -1, True), ScheduledChunk([6, 7, 8, 9], 0, [2], -1, True)]
for name, dev in (("cpu", "cpu"), ("cuda", "cuda")):
    lay = build_layout(chunks, 16, dev)
    out = paged_attention_ref(q.to(dev), kc.to(dev), vc.to(dev), lay, 0.25).cpu()
    if dev == "cpu":
        ref = out
    else:
        print("attention rel err", ((out - ref).norm() / ref.norm()).item(),
              "per row", [round(((out[i] - ref[i]).norm() / ref[i].norm()).item(), 4)
                          for i in range(9)])

# with adapters: pool contents after loading, then logits with one adapter and with four
import tempfile  # noqa: E402

from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter  # noqa
from punica_core.model.config import NAMED_SHAPES  # noqa: E402

root = Path(tempfile.mkdtemp())
ads = {f"a{i}": write_random_adapter(NAMED_SHAPES["tiny"], root / f"a{i}", r, ALL_PROJECTIONS,
                                     seed=i, b_scale=0.5) for i, r in enumerate((4, 8, 16, 64))}


def with_adapters(device, plan):
    loaded = load_model("random:tiny", "cpu", torch.float32)
    loaded.model = loaded.model.to(device, torch.float32)
    e = Engine(EngineConfig(model="random:tiny", device=device, kv_cache_gb=0.01,
                            max_adapters_on_gpu=4), loaded=loaded)
    for n, p in ads.items():
        e.register_adapter(n, p)
    e.runner.capture = cap = []
    for i, a in enumerate(plan):
        e.add_request([5 + i, 17, 99], SamplingParams(max_tokens=2, temperature=0,
                                                      ignore_eos=True), a)
    while e.has_work():
        e.step()
    pool = {p: (w.a.float().cpu().clone(), w.b.float().cpu().clone(), list(w.ranks_list),
                w.ranks.cpu().tolist()) for p, w in e.pool.weights.items()}
    return [c[1] for c in cap], pool, dict(e.pool._slot_of)


for plan in (["a0", "a1", None, "a2"], ["a0", "a1", "a2", "a3", None]):
    (la, pa, sa), (lb, pb, sb) = with_adapters("cpu", plan), with_adapters("cuda", plan)
    print(plan, "slots", sa, sb)
    for p in list(pa)[:1]:
        print("  ", p, "A diff", (pa[p][0] - pb[p][0]).abs().max().item(), "B diff",
              (pa[p][1] - pb[p][1]).abs().max().item(), "ranks", pa[p][2], pb[p][2], pb[p][3])
    for step, (x, y) in enumerate(zip(la, lb)):
        print("  step", step, "rel err per request",
              [round(((x[i] - y[i]).norm() / x[i].norm()).item(), 6) for i in range(len(x))])
