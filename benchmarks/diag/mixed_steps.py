"""Diagnostic: where the time goes when requests of different lengths come and go (continuous
batching), i.e. steps that prefill new requests beside the running decode batch.

    python benchmarks/diag/mixed_steps.py --model random:llama-2-7b --out /tmp/mixed_steps.json

Why: in engine_gpu.py's 1000-adapter case (128 requests, 64..192 new tokens each, batch 32) the
all-resident run took 24 s for 16k tokens while its 533 decode steps took 3.9 s: the other ~87
steps, which prefill the requests that take finished ones' places, or the time between steps,
took the rest. This runs the same kind of stream with every adapter resident, twice (the first
pass builds the shapes), and reports per kind of step (decode only / with prefill tokens) their
count and times, the time outside steps, the slowest steps with their token counts, and a
cProfile of the second pass (top functions by own time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import (check_device, default_adapter_dir, engine_config,  # noqa: E402
                               ensure_adapters, log, model_shape, random_prompts,
                               register_all, run_requests, warm_up, write_json)
from punica_core import Engine  # noqa: E402
from punica_core.engine import mixed_graphs  # noqa: E402
from punica_core.model import llama  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128, help="each request: uniform in [n/2, 3n/2]")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens-per-step", type=int, default=None,
                    help="default: batch x prompt-len, as engine_gpu.py")
    ap.add_argument("--paged-prefill", choices=("on", "off"), default=None,
                    help="llama.MIXED_STEP_PAGED_PREFILL (the paged Triton prefill kernel in "
                         "eager steps); default: the model's")
    ap.add_argument("--mixed-graphs", choices=("on", "off"), default=None,
                    help="engine/mixed_graphs.MIXED_GRAPHS (steps that prefill replayed from "
                         "CUDA graphs); default: the engine's")
    ap.add_argument("--out", default="/tmp/mixed_steps.json")
    args = ap.parse_args(argv)
    if args.paged_prefill:
        llama.MIXED_STEP_PAGED_PREFILL = args.paged_prefill == "on"
    if args.mixed_graphs:
        mixed_graphs.MIXED_GRAPHS = args.mixed_graphs == "on"
    device = check_device(args.device)
    cfg = model_shape(args.model)
    rng = random.Random(0)
    names = [f"a{i}" for i in range(args.adapters)]
    paths = ensure_adapters(cfg, default_adapter_dir(args.model, args.rank), names, args.rank,
                            list(range(len(names))))
    budget = args.max_tokens_per_step or args.batch * args.prompt_len
    engine = Engine(engine_config(model=args.model, device=str(device), max_batch=args.batch,
                                  max_lora_rank=args.rank, max_tokens_per_step=budget,
                                  kv_cache_gb=8 if device.type == "cuda" else 0.25,
                                  max_model_len=4096, max_adapters_on_gpu=args.adapters))
    register_all(engine, paths)
    warm_up(engine, cfg, args.batch, names[0], rng)
    adapters = rng.choices(names, k=args.requests)
    lo, hi = max(1, args.new_tokens // 2), args.new_tokens + args.new_tokens // 2
    counts = [rng.randint(lo, hi) for _ in range(args.requests)]
    prompts = random_prompts(cfg, args.requests, args.prompt_len, rng)
    out = {"model": args.model, "batch": args.batch, "requests": args.requests,
           "paged_prefill": engine.model.uses_paged_prefill(),
           "mixed_graphs": mixed_graphs.MIXED_GRAPHS,
           "max_tokens_per_step": budget, "first_pass": run_requests(engine, prompts, adapters,
                                                                     counts)}
    log("first pass", json.dumps(out["first_pass"]))
    n0 = engine.metrics.counters["steps"]
    prof = cProfile.Profile()
    prof.enable()
    out["second_pass"] = run_requests(engine, prompts, adapters, counts)
    prof.disable()
    log("second pass", json.dumps(out["second_pass"]))
    steps = engine.metrics.recent(engine.metrics.counters["steps"] - n0)
    slow = sorted(steps, key=lambda s: -s.duration_s)[:25]
    out["slowest_steps"] = [{"ms": s.duration_s * 1e3, "prefill_tokens": s.prefill_tokens,
                             "decode_rows": s.decode_rows, "requests": s.num_requests}
                            for s in slow]
    by_tokens: dict[int, list[float]] = {}
    for s in steps:
        if s.prefill_tokens:
            by_tokens.setdefault(s.prefill_tokens, []).append(s.duration_s * 1e3)
    out["prefill_steps_by_tokens"] = {str(k): {"n": len(v), "ms_mean": sum(v) / len(v)}
                                      for k, v in sorted(by_tokens.items())}
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    out["profile_top_tottime"] = text.getvalue().splitlines()[-45:]
    for line in out["profile_top_tottime"]:
        print(line)
    for s in out["slowest_steps"][:10]:
        print(s)
    print(json.dumps(out["prefill_steps_by_tokens"]))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
