"""Diagnostic: decode step time with and without CUDA graphs (Llama-2-7B shapes, bf16).

    python benchmarks/diag/decode_graphs.py --out /tmp/decode_graphs.json

Not a headline benchmark (benchmarks/engine_gpu.py is): a quick A/B of the graph runner and
the eager path on the same engine weights, for the none / identical / distinct mixes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from punica_core import Engine, EngineConfig, SamplingParams  # noqa: E402
from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter  # noqa
from punica_core.model.config import NAMED_SHAPES  # noqa: E402
from punica_core.model.loader import load_model  # noqa: E402


def decode_ms(engine, prompts, adapters, new_tokens):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    n0 = len(engine.metrics.steps)
    t0 = time.perf_counter()
    reqs = [engine.add_request(None, params, a, prompt_ids=p) for p, a in zip(prompts, adapters)]
    while engine.has_work():
        engine.step()
    dt = time.perf_counter() - t0
    steps = [s.duration_s * 1e3 for s in list(engine.metrics.steps)[n0:] if s.prefill_tokens == 0]
    return {"decode_step_ms_p50": statistics.median(steps),
            "tokens_per_s": sum(len(r.output_ids) for r in reqs) / dt}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="/tmp/decode_graphs.json")
    args = ap.parse_args()
    cfg = NAMED_SHAPES[args.model.split(":", 1)[1]]
    tmp = Path(tempfile.mkdtemp())
    names = [f"a{i}" for i in range(args.adapters)]
    t0 = time.perf_counter()
    paths = {n: write_random_adapter(cfg, tmp / n, 16, ALL_PROJECTIONS, seed=i)
             for i, n in enumerate(names)}
    print(f"adapters written in {time.perf_counter() - t0:.1f}s", flush=True)
    loaded = load_model(args.model, "cuda", torch.bfloat16)
    prompts = [[3 + (i * 37 + j) % 30000 for j in range(128)] for i in range(args.batch)]
    mixes = {"none": [None] * args.batch, "identical": [names[0]] * args.batch,
             "distinct": [names[i % len(names)] for i in range(args.batch)]}
    out = {"model": args.model, "device": torch.cuda.get_device_name(), "batch": args.batch}
    for graphs in (True, False):
        e = Engine(EngineConfig(model=args.model, max_batch=args.batch,
                                max_adapters_on_gpu=args.adapters, max_lora_rank=16,
                                max_tokens_per_step=args.batch * 128, kv_cache_gb=8,
                                max_model_len=4096, cuda_graphs=graphs), loaded=loaded)
        for n in names:
            e.register_adapter(n, paths[n])
        for adapters in mixes.values():
            decode_ms(e, prompts, adapters, 4)      # warm-up (and graph capture)
        res = {m: decode_ms(e, prompts, a, args.new_tokens) for m, a in mixes.items()}
        res["graphs_captured"] = e.runner.graphs.captured if e.runner.graphs else []
        out["graphs" if graphs else "eager"] = res
        print("graphs" if graphs else "eager", json.dumps(res), flush=True)
        e.close()
        del e
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
