"""Engine throughput on a GPU: Llama-2 shapes with random bf16 weights, Punica's adapter mixes,
and transformers + PEFT measured in the same run.

    python benchmarks/engine_gpu.py --model random:llama-2-7b --out benchmarks/results/engine_gpu_7b.json

Mixes (Punica's evaluation): distinct (every request its own adapter), uniform (drawn with
replacement from the pool), skewed (Zipf, alpha 1.5), identical (one adapter for all), none.
Reports tokens/s (prefill included), decode step p50/p99 from the engine's step records, the
time LoRA adds to a decode step against `none`, and peak GPU memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from punica_core import Engine, EngineConfig, SamplingParams  # noqa: E402
from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter  # noqa
from punica_core.model.config import NAMED_SHAPES  # noqa: E402
from punica_core.ops.backend import cuda_ops  # noqa: E402


def mix_adapters(mix: str, pool: list[str], n: int, rng: random.Random) -> list:
    if mix == "none":
        return [None] * n
    if mix == "identical":
        return [pool[0]] * n
    if mix == "distinct":
        return pool[:n]
    if mix == "uniform":
        return [rng.choice(pool) for _ in range(n)]
    if mix == "skewed":
        weights = [1 / (i + 1) ** 1.5 for i in range(len(pool))]
        return rng.choices(pool, weights=weights, k=n)
    raise ValueError(mix)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else None


def run_ours(engine, prompts, adapters, new_tokens):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    n_before = len(engine.metrics.steps)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reqs = [engine.add_request(None, params, a, prompt_ids=p) for p, a in zip(prompts, adapters)]
    while engine.has_work():
        engine.step()
    dt = time.perf_counter() - t0
    steps = list(engine.metrics.steps)[n_before:]
    decode = [s.duration_s * 1e3 for s in steps if s.prefill_tokens == 0]
    return {"tokens_per_s": sum(len(r.output_ids) for r in reqs) / dt, "seconds": dt,
            "decode_step_ms_p50": pct(decode, 50), "decode_step_ms_p99": pct(decode, 99),
            "distinct_adapters": len({a for a in adapters if a})}


def run_peft(cfg, paths, prompts, adapters, new_tokens, device):
    """transformers + PEFT on the same shapes (random weights), one generate call."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    results = {}
    used = [a for a in dict.fromkeys(adapters) if a]
    peft = PeftModel.from_pretrained(model, str(paths[used[0]]), adapter_name=used[0])
    for a in used[1:]:
        peft.load_adapter(str(paths[a]), adapter_name=a)
    ids = torch.tensor(prompts, device=device)
    for label, names in (("peft_one_adapter", [used[0]] * len(prompts)),
                         ("peft_mixed", adapters)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0, adapter_names=names)
        torch.cuda.synchronize()
        results[label] = {"tokens_per_s": (out.shape[1] - ids.shape[1]) * ids.shape[0]
                          / (time.perf_counter() - t0), "new_tokens": new_tokens}
    with peft.disable_adapter():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        results["hf_no_adapter"] = {"tokens_per_s": (out.shape[1] - ids.shape[1])
                                    * ids.shape[0] / (time.perf_counter() - t0),
                                    "new_tokens": new_tokens}
    del peft, model
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mixes", default="none,identical,distinct,uniform,skewed")
    ap.add_argument("--peft-new-tokens", type=int, default=16,
                    help="the PEFT baseline generates fewer tokens (it is slow); tokens/s")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--rounds", type=int, default=2,
                    help="measure every mix this many times, in rounds; the last round is "
                         "reported (the first ones absorb the GPU's and host's warm-up)")
    ap.add_argument("--out", default="benchmarks/results/engine_gpu.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    cfg = NAMED_SHAPES[args.model.split(":", 1)[1]]
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-adapters-"))
    pool = [f"a{i}" for i in range(args.batch)]
    t0 = time.perf_counter()
    paths = {n: write_random_adapter(cfg, tmp / n, args.rank, ALL_PROJECTIONS, seed=i)
             for i, n in enumerate(pool)}
    print(f"adapters written in {time.perf_counter() - t0:.1f}s", flush=True)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt_len)]
               for _ in range(args.batch)]
    engine = Engine(EngineConfig(model=args.model, max_batch=args.batch,
                                 max_adapters_on_gpu=args.batch, max_lora_rank=args.rank,
                                 max_tokens_per_step=args.batch * args.prompt_len,
                                 kv_cache_gb=8, max_model_len=4096))
    for n in pool:
        engine.register_adapter(n, paths[n])
    for mix in args.mixes.split(","):       # warm every path up first (cuBLAS, kernels)
        run_ours(engine, prompts, mix_adapters(mix, pool, args.batch, random.Random(1)), 4)
    rounds = []
    for r in range(args.rounds):
        ours = {}
        for mix in args.mixes.split(","):
            ours[mix] = run_ours(engine, prompts, mix_adapters(mix, pool, args.batch, rng),
                                 args.new_tokens)
            print(f"round {r}", mix, json.dumps(ours[mix]), flush=True)
        rounds.append(ours)
    peak = torch.cuda.max_memory_allocated() / 2**30
    base = ours.get("none", {}).get("decode_step_ms_p50")
    for r in ours.values():
        if base and r["decode_step_ms_p50"]:
            r["lora_added_ms_p50"] = r["decode_step_ms_p50"] - base
    lora_bytes = args.batch * cfg.num_layers * args.rank * sum(
        i + o for i, o in cfg.proj_shapes.values()) * 2
    out = {"benchmark": "engine_gpu", "model": args.model, "dtype": "bfloat16",
           "device": torch.cuda.get_device_name(), "batch": args.batch,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "adapter_rank": args.rank, "adapter_targets": ALL_PROJECTIONS,
           "cuda_sgmv_kernels": cuda_ops() is not None, "ours": ours,
           "all_rounds": rounds,
           "peak_gpu_memory_gib": peak, "distinct_adapter_bytes_per_step": lora_bytes}
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    if not args.skip_peft:
        mixed = mix_adapters("distinct", pool, args.batch, rng)
        out["baseline"] = run_peft(cfg, paths, prompts, mixed, args.peft_new_tokens, device)
        print("baseline", json.dumps(out["baseline"]), flush=True)
        if "distinct" in ours:
            out["ratios"] = {
                "distinct_vs_peft_mixed": ours["distinct"]["tokens_per_s"]
                / out["baseline"]["peft_mixed"]["tokens_per_s"]}
    if "distinct" in ours and "identical" in ours:
        out.setdefault("ratios", {})["distinct_vs_identical"] = \
            ours["distinct"]["tokens_per_s"] / ours["identical"]["tokens_per_s"]
    if "identical" in ours and "none" in ours:
        out.setdefault("ratios", {})["identical_vs_none"] = \
            ours["identical"]["tokens_per_s"] / ours["none"]["tokens_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out.get("ratios", {}), indent=2))


if __name__ == "__main__":
    main()
