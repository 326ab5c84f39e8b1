"""Diagnostic: where a decode step's GPU time goes, kernel by kernel (torch.profiler / CUPTI),
for the none / identical / distinct mixes on Llama-2-7B shapes in bf16.

    python benchmarks/diag/decode_profile.py --out /tmp/decode_profile.json [--lora-overlap off]

Not a headline benchmark (benchmarks/engine_gpu.py is): it answers "is the LoRA time in our
kernels, or do the base kernels slow down beside them" by summing each kernel's device time
per decode step. Kernels inside CUDA graph replays are traced too (CUPTI reports them).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from punica_core import Engine, EngineConfig, SamplingParams  # noqa: E402
from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter  # noqa
from punica_core.model.config import NAMED_SHAPES  # noqa: E402
from punica_core.model.loader import load_model  # noqa: E402


def short(name: str) -> str:
    """Kernel names are long templates: keep the part that tells kernels apart."""
    name = name.replace("void ", "")
    for cut in ("(", "<"):
        if cut in name and not name.startswith(("sm90", "cutlass", "nvjet")):
            name = name.split(cut, 1)[0]
    return name[:90]


def profile_decode(engine, prompts, adapters, steps: int) -> dict:
    params = SamplingParams(max_tokens=4 + steps, temperature=0, ignore_eos=True)
    for p, a in zip(prompts, adapters):
        engine.add_request(None, params, a, prompt_ids=p)
    for _ in range(3):                  # prefill, then decode steps outside the trace
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    while engine.has_work():
        engine.step()
    # the same steps again without the profiler: its overhead stretches the host side
    for p, a in zip(prompts, adapters):
        engine.add_request(None, params, a, prompt_ids=p)
    n0 = len(engine.metrics.steps)
    while engine.has_work():
        engine.step()
    plain = [s.duration_s * 1e3 for s in list(engine.metrics.steps)[n0:] if s.prefill_tokens == 0]
    per = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            k = per[short(ev.name)]
            k[0] += 1
            k[1] += ev.device_time_total
    kernels = sorted(((n, c / steps, us / steps) for n, (c, us) in per.items()),
                     key=lambda t: -t[2])
    return {"step_wall_ms": wall * 1e3, "step_ms_p50_unprofiled": statistics.median(plain),
            "kernel_us_per_step": sum(us for _, _, us in kernels),
            "kernels": [{"name": n, "calls": round(c, 2), "us": round(us, 1)}
                        for n, c, us in kernels[:25]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--lora-overlap", choices=("on", "off"), default="on")
    ap.add_argument("--cluster", type=int, default=0,
                    help="force the fused kernel's CTAs per (segment, projection); 0: its own")
    ap.add_argument("--out", default="/tmp/decode_profile.json")
    args = ap.parse_args()
    if args.cluster:
        from punica_core.ops import cuda_backend
        cuda_backend.add_lora = functools.partial(cuda_backend.add_lora, cluster=args.cluster)
    cfg = NAMED_SHAPES[args.model.split(":", 1)[1]]
    tmp = Path(tempfile.mkdtemp())
    names = [f"a{i}" for i in range(args.batch)]
    paths = {n: write_random_adapter(cfg, tmp / n, 16, ALL_PROJECTIONS, seed=i)
             for i, n in enumerate(names)}
    loaded = load_model(args.model, "cuda", torch.bfloat16)
    extra = {"lora_overlap": args.lora_overlap == "on"}
    e = Engine(EngineConfig(model=args.model, max_batch=args.batch,
                            max_adapters_on_gpu=args.batch, max_lora_rank=16,
                            max_tokens_per_step=args.batch * 128, kv_cache_gb=8,
                            max_model_len=4096, cuda_graphs=not args.no_graphs, **extra),
               loaded=loaded)
    for n in names:
        e.register_adapter(n, paths[n])
    prompts = [[3 + (i * 37 + j) % 30000 for j in range(128)] for i in range(args.batch)]
    mixes = {"none": [None] * args.batch, "identical": [names[0]] * args.batch,
             "distinct": names}
    for a in mixes.values():            # warm-up and graph capture
        profile_decode(e, prompts, a, 2)
    out = {"model": args.model, "device": torch.cuda.get_device_name(),
           "graphs": not args.no_graphs, "lora_overlap": args.lora_overlap == "on",
           "cluster": args.cluster,
           "mixes": {m: profile_decode(e, prompts, a, args.steps) for m, a in mixes.items()}}
    for m, r in out["mixes"].items():
        print(f"== {m}: step p50 {r['step_ms_p50_unprofiled']:.3f} ms unprofiled, wall "
              f"{r['step_wall_ms']:.2f} ms/step profiled, kernels "
              f"{r['kernel_us_per_step'] / 1e3:.2f} ms/step")
        for k in r["kernels"][:14]:
            print(f"   {k['us']:8.1f} us {k['calls']:6.1f}x  {k['name']}")
    Path(args.out).write_text(json.dumps(out, indent=2))
    e.close()


if __name__ == "__main__":
    main()
