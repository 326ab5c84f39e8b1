"""Engine throughput on a GPU: Llama-2 shapes with random bf16 weights, Punica's adapter mixes,
and transformers + PEFT measured in the same run.

    python benchmarks/engine_gpu.py --model random:llama-2-7b --many-adapters 1000 \
        --out benchmarks/results/engine_gpu_7b.json
    python benchmarks/engine_gpu.py --model random:tiny --device cpu --out /tmp/e.json  # smoke

Mixes (Punica's evaluation): distinct (every request its own adapter), uniform (drawn with
replacement from the pool), skewed (Zipf, alpha 1.5), identical (one adapter for all), none;
plus lora_off: `none` on a second engine over the same weights with enable_lora=False.
Reports tokens/s (prefill included), decode step p50/p99 from the engine's step records, the
time LoRA adds to a decode step against `none`, peak GPU memory, and a memory roofline: the
bytes a decode step must read (weights with lm_head once, the batch's KV cache at the mean
context, the distinct adapters at their real rank) over the device copy bandwidth measured in
the same run.

--many-adapters N: N registered adapters (aliases of --distinct-files files), --slots device
slots and a --host-cache smaller than N; a stream of requests whose adapters are drawn Zipf
from the N, against the same stream with the whole working set resident.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (ALL_PROJECTIONS, GIB, adapter_bytes, check_device,  # noqa: E402
                               config_dict, copy_bandwidth, default_adapter_dir,
                               engine_config, ensure_adapters, environment, has_config_field,
                               log, model_shape, pct, random_prompts, register_all,
                               renamed, run_requests, sync, warm_up, write_json)
from punica_core import Engine  # noqa: E402
from punica_core.adapters import pinned_memory  # noqa: E402
from punica_core.engine import mixed_graphs, scheduler  # noqa: E402
from punica_core.model import lora as lora_model  # noqa: E402
from punica_core.model.kv_cache import KVCache  # noqa: E402
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
    model = model.to(torch.bfloat16).to_empty(device=device)     # never fp32 on the device
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():       # to_empty leaves them uninitialised (rotary inv_freq)
            b.zero_()
    model.eval()
    used = [a for a in dict.fromkeys(adapters) if a]
    peft = PeftModel.from_pretrained(model, str(paths[used[0]]), adapter_name=used[0])
    for a in used[1:]:
        peft.load_adapter(str(paths[a]), adapter_name=a)
    ids = torch.tensor(prompts, device=device)

    def generate(**kw):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0, **kw)
        sync(device)
        return {"tokens_per_s": (out.shape[1] - ids.shape[1]) * ids.shape[0]
                / (time.perf_counter() - t0), "new_tokens": new_tokens}

    results = {"peft_one_adapter": generate(adapter_names=[used[0]] * len(prompts)),
               "peft_mixed": generate(adapter_names=adapters)}
    with peft.disable_adapter():
        results["hf_no_adapter"] = generate()
    del peft, model
    return results


def roofline(engine, result: dict, batch: int, context: float, per_adapter: int,
             bandwidth: float) -> dict:
    """Bytes one decode step must read, and the time that takes at `bandwidth` (bytes/s)."""
    m = engine.model
    embed = 0 if m.lm_head is m.embed else m.embed.numel() * m.embed.element_size()
    weights = m.weight_bytes - embed        # embedding rows gathered: negligible
    kv = batch * context * KVCache.bytes_per_token(m.cfg, m.dtype)
    adapters = result["distinct_adapters"] * per_adapter
    ms = (weights + kv + adapters) / bandwidth * 1e3
    out = {"bytes_weights": weights, "bytes_kv": kv, "bytes_adapters": adapters,
           "decode_step_roofline_ms": ms}
    if result.get("decode_step_ms_p50"):
        out["roofline_fraction"] = ms / result["decode_step_ms_p50"]
    return out


def free(*engines) -> None:
    for e in engines:
        if e is not None:
            e.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_many(args, cfg, loaded, paths: dict, common: dict, rng: random.Random) -> dict:
    """N adapters (aliases of a few files), few slots and a small host cache, against the same
    request stream with the whole working set resident."""
    files = list(paths)[:args.distinct_files]
    aliases = [f"z{i}" for i in range(args.many_adapters)]
    file_of = {a: files[i % len(files)] for i, a in enumerate(aliases)}
    weights = [1 / (i + 1) ** args.zipf_alpha for i in range(len(aliases))]
    n_req = args.waves * args.batch
    adapters = rng.choices(aliases, weights=weights, k=n_req)
    lo, hi = max(1, args.new_tokens // 2), args.new_tokens + args.new_tokens // 2
    counts = [rng.randint(lo, hi) for _ in range(n_req)]
    prompts = random_prompts(cfg, n_req, args.prompt_len, rng)
    working = list(dict.fromkeys(adapters))
    out = {"registered_adapters": len(aliases), "distinct_files": len(files),
           "registration": f"{len(files)} files registered (parsed); each of the "
                           f"{len(aliases)} names is registered lazily (register_adapter(..., "
                           f"lazy=True): config and header only) on folder i % {len(files)}, "
                           "and read from it on first use",
           "zipf_alpha": args.zipf_alpha, "requests": n_req, "max_batch": args.batch,
           "new_tokens_per_request": f"uniform in [{lo}, {hi}] (same sequence in both runs)",
           "working_set": len(working), "slots": args.slots,
           "host_cache_adapters": args.host_cache, "loader_workers": args.loader_workers,
           "reserve_pinned": args.reserve_pinned}

    def build(slots, host_cache):
        e = Engine(engine_config(**common, max_adapters_on_gpu=slots,
                                 host_cache_adapters=host_cache,
                                 adapter_loader_workers=args.loader_workers), loaded=loaded)
        t = register_all(e, {n: paths[n] for n in files})
        t0 = time.perf_counter()
        for a in aliases:
            e.register_adapter(a, paths[file_of[a]], lazy=True)
        log(f"many: {len(files)} files registered in {t:.1f}s, {len(aliases)} aliases in "
            f"{time.perf_counter() - t0:.2f}s ({slots} slots, host cache {host_cache})")
        if args.reserve_pinned == "on":
            t1 = time.perf_counter()
            nbytes = e.store.reserve_pinned_blocks()
            out.setdefault("pinned_reserved_before_the_clock", []).append(
                {"bytes": nbytes, "seconds": time.perf_counter() - t1})
            log(f"many: {nbytes / GIB:.1f} GiB pinned ahead in {time.perf_counter() - t1:.1f}s")
        if args.capture_graphs_first == "on":
            n, secs = e.capture_graphs()
            out.setdefault("graphs_captured_before_the_clock", []).append(
                {"graphs": n, "seconds": secs})
            log(f"many: {n} CUDA graphs captured in {secs:.1f}s")
        return e, t

    rounds = []
    for rnd in range(args.many_rounds):
        rounds.append(many_round(args, cfg, build, files, working, file_of, prompts, adapters,
                                 counts, rng, first=rnd == 0))
    out.update(rounds[-1])
    out["rounds"] = rounds
    out["ratios_median_of_rounds"] = {}
    for key, run in (("many_vs_resident", "many"), ("many_warm_host_vs_resident",
                                                      "many_warm_host")):
        per = [r[run]["tokens_per_s"] / r["resident"]["tokens_per_s"] for r in rounds]
        out[key] = per[-1]
        out["ratios_median_of_rounds"][key] = {"median": statistics.median(per),
                                               "per_round": per}
    return out


def many_round(args, cfg, build, files, working, file_of, prompts, adapters, counts, rng,
               first: bool) -> dict:
    """One round of the zipf case: resident, cold, warm host cache (fresh engines each)."""
    out = {}
    # 1. the whole working set resident in slots (loaded before the clock starts)
    e, t_reg = build(len(working), max(len(files), args.host_cache))
    for a in working:
        parsed = e.store.get_cached(file_of[a])
        if parsed is None or e.pool.load(renamed(parsed, a)) is None:
            raise RuntimeError(f"resident run: could not preload {a!r} ({file_of[a]})")
    sync(e.model.device)
    warm_up(e, cfg, args.batch, working[0], rng)
    loads = e.pool.loads
    # an untimed pass of the same stream first: the prefill shapes of 128-token prompts build
    # their kernels (Triton compiles per shape) here, not inside the first timed run
    if first:
        out["resident_untimed_first_pass"] = run_requests(e, prompts, adapters, counts)
    out["resident"] = run_requests(e, prompts, adapters, counts)
    out["resident"]["loads"] = e.pool.loads - loads
    log("many: resident", json.dumps(out["resident"]))
    free(e)
    del e
    # 2. --slots slots and a host cache of --host-cache parsed adapters, empty at the start:
    #    loads, evictions and disk reads (cold start); 3. the same slots with the working set
    #    parsed in the host cache beforehand (steady state: only slot loads and evictions)
    for label, host_cache, warm in (("many", args.host_cache, False),
                                    ("many_warm_host", max(len(working), args.host_cache), True)):
        e, t_reg = build(args.slots, host_cache)
        out["file_registration_s"] = t_reg
        warm_up(e, cfg, args.batch, files[0], rng)
        if warm:
            t0 = time.perf_counter()
            for a in working:
                e.store.prefetch(a)
            while not all(e.store.is_cached(a) for a in working):
                time.sleep(0.01)
            log(f"many: working set of {len(working)} parsed into the host cache in "
                f"{time.perf_counter() - t0:.1f}s")
        reads_before, slot_loads_before = len(e.store.read_times), len(e.pool.load_times)
        parses, parse_s = e.store.parses, e.store.parse_seconds
        loads, evictions = e.pool.loads, e.pool.evictions
        cold = sum(1 for a in working if not e.store.is_cached(a))
        t_run = time.perf_counter()
        out[label] = run_requests(e, prompts, adapters, counts)
        out[label]["load_timeline"] = load_timeline(
            list(e.store.read_times)[reads_before:], list(e.pool.load_times)[slot_loads_before:],
            t_run)
        out[label].update(loads=e.pool.loads - loads, evictions=e.pool.evictions - evictions,
                          host_cache_adapters=host_cache,
                          adapters_not_in_host_cache_at_start=cold,
                          host_parses=e.store.parses - parses,
                          host_parse_seconds=e.store.parse_seconds - parse_s)
        log(f"many: {label}", json.dumps(out[label]))
        free(e)
        del e
    return out


def load_timeline(reads, slot_loads, t0: float) -> dict:
    """Background reads (queued, started, done) and slot loads (issued, seen ready) during a
    run: how long reads queued and took, when the last was done, and how long slot loads
    took to be seen ready (t0: the run's start)."""
    def stats(xs):
        xs = sorted(xs)
        return {"n": len(xs), "p50_ms": pct(xs, 50) * 1e3, "max_ms": xs[-1] * 1e3} if xs \
            else {"n": 0}
    return {"read_queued": stats([s - q for q, s, _ in reads]),
            "read_took": stats([d - s for _, s, d in reads]),
            "reads_done_by_s": sorted(d - t0 for _, _, d in reads)[-1:] or None,
            "reads_done_in_first_s": sum(1 for _, _, d in reads if d - t0 < 1.0),
            "slot_load_to_ready": stats([r - i for i, r in slot_loads if i])}


ROUND_RATIOS = {   # name: (mix, its anchor, field)
    "none_vs_lora_off_tokens_per_s": ("none", "lora_off", "tokens_per_s"),
    "none_vs_lora_off_decode_step_p50": ("none", "lora_off", "decode_step_ms_p50"),
    "distinct_vs_identical": ("distinct", "identical", "tokens_per_s"),
    "identical_vs_none": ("identical", "none", "tokens_per_s"),
}


def median_round_ratios(rounds: list[dict]) -> dict:
    """Each ROUND_RATIOS ratio per round and its median over the rounds (where both mixes ran)."""
    out = {}
    for name, (mix, anchor, key) in ROUND_RATIOS.items():
        per = [r[mix][key] / r[anchor][key] for r in rounds
               if mix in r and anchor in r and r[mix][key] and r[anchor][key]]
        if per:
            out[name] = {"median": statistics.median(per), "per_round": per}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="8 on cuda, 0.25 on cpu")
    ap.add_argument("--mixes", default="none,identical,distinct,uniform,skewed")
    ap.add_argument("--peft-new-tokens", type=int, default=16,
                    help="the PEFT baseline generates fewer tokens (it is slow); tokens/s")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-lora-off", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measure every mix this many times, in rounds; `ours` and `ratios` are "
                         "the last round (the first ones absorb the GPU's and host's warm-up), "
                         "`ratios_median_of_rounds` the median of the per-round ratios")
    ap.add_argument("--copy-gib", type=float, default=2.0,
                    help="size of the device-to-device copy (1/32 of it on cpu)")
    ap.add_argument("--lora-overlap", choices=("auto", "on", "off"), default="auto",
                    help="EngineConfig.lora_overlap: each site's LoRA on a side stream "
                         "(auto: the engine's default, on for CUDA)")
    ap.add_argument("--overlap-kernel", choices=("streamed", "fused"), default=None,
                    help="model/lora.py's OVERLAP_KERNEL for the LoRA beside each GEMM "
                         "(default: the engine's, streamed)")
    ap.add_argument("--many-adapters", type=int, default=0, help="N for the zipf case; 0: skip")
    ap.add_argument("--device-stacking", choices=("auto", "on", "off"), default="auto",
                    help="EngineConfig.adapter_device_stacking: adapters read in the background "
                         "are stacked on the device at slot load (auto: the engine's default, "
                         "on for CUDA)")
    ap.add_argument("--slots", type=int, default=32, help="device slots in the zipf case")
    ap.add_argument("--many-rounds", type=int, default=3,
                    help="zipf case: rounds of (resident, cold, warm host); the ratios' "
                         "median over rounds is reported beside the last round's")
    ap.add_argument("--host-cache", type=int, default=64, help="host cache in the zipf case")
    ap.add_argument("--loader-workers", type=int, default=4,
                    help="EngineConfig.adapter_loader_workers in the zipf case")
    ap.add_argument("--gil-switch-interval-ms", type=float, default=None,
                    help="sys.setswitchinterval for the run (default: Python's, 5 ms)")
    ap.add_argument("--mixed-graphs", choices=("on", "off"), default=None,
                    help="engine/mixed_graphs.MIXED_GRAPHS: steps that prefill beside decode "
                         "rows replayed from CUDA graphs; default: the engine's (on)")
    ap.add_argument("--stop-loads-when-step-done", choices=("on", "off"), default=None,
                    help="engine/scheduler.STOP_LOADS_WHEN_STEP_DONE: in a step's shadow, no "
                         "more slot loads (after the first) once the step is done on the GPU; "
                         "default: the engine's (off)")
    ap.add_argument("--reserve-pinned", choices=("on", "off"), default="on",
                    help="zipf case: pin the host cache's blocks for the registered files "
                         "before the clock (AdapterStore.reserve_pinned_blocks, as a serving "
                         "loop's start does: EngineConfig.reserve_pinned_host_cache), so that "
                         "cold reads reuse them instead of pinning while the engine runs")
    ap.add_argument("--pinned-cuda-host-alloc", action="store_true",
                    help="the host cache's pinned memory from cudaHostAlloc (torch's default) "
                         "instead of malloc + cudaHostRegister (the store's)")
    ap.add_argument("--capture-graphs-first", choices=("on", "off"), default="on",
                    help="zipf case: every engine captures all its CUDA graph buckets "
                         "(Engine.capture_graphs) before the clock starts, as the serving "
                         "loops do (on), or on first use inside the timed runs (off)")
    ap.add_argument("--distinct-files", type=int, default=16, help="files behind the N names")
    ap.add_argument("--zipf-alpha", type=float, default=1.0)
    ap.add_argument("--waves", type=int, default=4, help="zipf case: waves x batch requests")
    ap.add_argument("--adapter-dir", default=None, help="default: shared cache under /tmp")
    ap.add_argument("--out", default="benchmarks/results/engine_gpu.json")
    args = ap.parse_args(argv)
    device = check_device(args.device)
    cfg = model_shape(args.model)
    rng = random.Random(0)
    t_start = time.perf_counter()
    mixes = args.mixes.split(",")
    out = {"benchmark": "engine_gpu", "model": args.model, **environment(device),
           "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "adapter_rank": args.rank, "adapter_targets": ALL_PROJECTIONS,
           "cuda_sgmv_kernels": device.type == "cuda" and cuda_ops() is not None, "notes": []}

    gib = args.copy_gib if device.type == "cuda" else args.copy_gib / 32
    out["copy_bandwidth"] = copy_bandwidth(device, int(gib * GIB))
    bandwidth = out["copy_bandwidth"]["gb_per_s"] * 1e9
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")

    pool = [f"a{i}" for i in range(max(args.batch, args.distinct_files))]
    paths = ensure_adapters(cfg, Path(args.adapter_dir) if args.adapter_dir
                            else default_adapter_dir(args.model, args.rank), pool, args.rank,
                            list(range(len(pool))))
    pool = pool[:args.batch]
    prompts = random_prompts(cfg, args.batch, args.prompt_len, rng)
    common = dict(model=args.model, device=str(device), max_batch=args.batch,
                  max_lora_rank=args.rank, max_tokens_per_step=args.batch * args.prompt_len,
                  kv_cache_gb=args.kv_cache_gb or (8 if device.type == "cuda" else 0.25),
                  max_model_len=4096)
    if args.device_stacking != "auto":
        common["adapter_device_stacking"] = args.device_stacking == "on"
    if args.gil_switch_interval_ms:
        sys.setswitchinterval(args.gil_switch_interval_ms / 1e3)
    if args.pinned_cuda_host_alloc:
        pinned_memory.REGISTER_HOST_MEMORY = False
    if args.mixed_graphs:
        mixed_graphs.MIXED_GRAPHS = args.mixed_graphs == "on"
    if args.stop_loads_when_step_done:
        scheduler.STOP_LOADS_WHEN_STEP_DONE = args.stop_loads_when_step_done == "on"
    if args.lora_overlap != "auto":
        common["lora_overlap"] = args.lora_overlap == "on"
    if args.overlap_kernel:
        lora_model.OVERLAP_KERNEL = args.overlap_kernel
    out["overlap_kernel"] = lora_model.OVERLAP_KERNEL
    t0 = time.perf_counter()
    engine = Engine(engine_config(**common, max_adapters_on_gpu=args.batch))
    log(f"model ready in {time.perf_counter() - t0:.1f}s")
    out["engine_config"] = config_dict(engine)
    out["python_switch_interval_ms"] = sys.getswitchinterval() * 1e3
    out["adapter_device_stacking"] = engine.store.device_stacking
    out["mixed_graphs"] = mixed_graphs.MIXED_GRAPHS
    out["stop_loads_when_step_done"] = scheduler.STOP_LOADS_WHEN_STEP_DONE
    out["host_cache_pinned_memory"] = "malloc + cudaHostRegister" \
        if engine.store.registered_host_memory else "cudaHostAlloc"
    out["lora_overlap"] = engine.runner.lora_overlap      # what the engine resolved
    out["dtype"] = str(engine.model.dtype).removeprefix("torch.")
    out["adapter_registration_s"] = register_all(engine, {n: paths[n] for n in pool})
    log(f"{len(pool)} adapters registered in {out['adapter_registration_s']:.1f}s")
    off = None
    if args.skip_lora_off:
        out["notes"].append("lora_off skipped (--skip-lora-off)")
    elif not has_config_field("enable_lora"):
        out["notes"].append("lora_off skipped: EngineConfig has no enable_lora field")
        log("note: EngineConfig has no enable_lora; lora_off skipped")
    else:
        off = Engine(engine_config(**common, max_adapters_on_gpu=args.batch,
                                   enable_lora=False), loaded=engine.loaded)
    for mix in mixes:       # warm every path up first (cuBLAS, kernels, graphs)
        run_requests(engine, prompts, mix_adapters(mix, pool, args.batch, random.Random(1)), 4)
    if off is not None:
        run_requests(off, prompts, [None] * args.batch, 4)
    log("warm-up done")
    rounds = []
    for r in range(args.rounds):
        ours = {}
        for mix in mixes:
            ours[mix] = run_requests(engine, prompts, mix_adapters(mix, pool, args.batch, rng),
                                     args.new_tokens)
            log(f"round {r}", mix, json.dumps(ours[mix]))
            if mix == "none" and off is not None:   # its anchor right after it, same conditions
                ours["lora_off"] = run_requests(off, prompts, [None] * args.batch,
                                                args.new_tokens)
                log(f"round {r} lora_off", json.dumps(ours["lora_off"]))
        if off is not None and "lora_off" not in ours:
            ours["lora_off"] = run_requests(off, prompts, [None] * args.batch, args.new_tokens)
            log(f"round {r} lora_off", json.dumps(ours["lora_off"]))
        rounds.append(ours)
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    per_adapter = adapter_bytes(cfg, args.rank, elem_size=engine.model.dtype.itemsize)
    context = args.prompt_len + args.new_tokens / 2
    base = ours.get("none", {}).get("decode_step_ms_p50")
    for r in ours.values():
        if base and r["decode_step_ms_p50"]:
            r["lora_added_ms_p50"] = r["decode_step_ms_p50"] - base
        r.update(roofline(engine, r, args.batch, context, per_adapter, bandwidth))
    out["roofline"] = {"bandwidth_gb_per_s": bandwidth / 1e9, "mean_context": context,
                       "adapter_bytes_each": per_adapter,
                       "method": "bytes = weights (lm_head once, embedding gather not "
                                 "counted) + batch x mean context x KV bytes/token + distinct "
                                 "adapters x real-rank bytes; ms = bytes / copy bandwidth"}
    out.update(ours=ours, all_rounds=rounds,
               distinct_adapter_bytes_per_step=args.batch * per_adapter)
    ratios = {}
    if "distinct" in ours and "lora_added_ms_p50" in ours["distinct"]:
        read_ms = ours["distinct"]["bytes_adapters"] / bandwidth * 1e3
        out["distinct_adapter_bytes_read_ms"] = read_ms
        ratios["distinct_lora_added_vs_adapter_read"] = \
            ours["distinct"]["lora_added_ms_p50"] / read_ms
    if "none" in ours and "lora_off" in ours:
        ratios["none_vs_lora_off_tokens_per_s"] = \
            ours["none"]["tokens_per_s"] / ours["lora_off"]["tokens_per_s"]
        ratios["none_vs_lora_off_decode_step_p50"] = \
            ours["none"]["decode_step_ms_p50"] / ours["lora_off"]["decode_step_ms_p50"]
    if "distinct" in ours and "identical" in ours:
        ratios["distinct_vs_identical"] = \
            ours["distinct"]["tokens_per_s"] / ours["identical"]["tokens_per_s"]
    if "identical" in ours and "none" in ours:
        ratios["identical_vs_none"] = \
            ours["identical"]["tokens_per_s"] / ours["none"]["tokens_per_s"]
    # the same ratios per round (each pair measured in one round, one after the other where
    # the order allows), and their median over the rounds: steadier than the last round alone
    out["ratios_median_of_rounds"] = median_round_ratios(rounds)
    write_json(args.out, {**out, "ratios": ratios, "partial": True})
    loaded = engine.loaded
    free(engine, off)
    del engine, off
    if args.many_adapters:
        out["many_adapters"] = run_many(args, cfg, loaded, paths, common, rng)
        ratios["many_vs_resident"] = out["many_adapters"]["many_vs_resident"]
        ratios["many_warm_host_vs_resident"] = out["many_adapters"]["many_warm_host_vs_resident"]
        write_json(args.out, {**out, "ratios": ratios, "partial": True})
    del loaded
    free()
    if not args.skip_peft and "distinct" in mixes:
        mixed = mix_adapters("distinct", pool, args.batch, rng)
        out["baseline"] = run_peft(cfg, paths, prompts, mixed, args.peft_new_tokens, device)
        log("baseline", json.dumps(out["baseline"]))
        ratios["distinct_vs_peft_mixed"] = ours["distinct"]["tokens_per_s"] \
            / out["baseline"]["peft_mixed"]["tokens_per_s"]
    out["ratios"] = ratios
    if device.type == "cuda":
        out["peak_gpu_memory_gib_whole_run"] = torch.cuda.max_memory_allocated(device) / GIB
    out["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, out)
    print(json.dumps(ratios, indent=2), flush=True)
    return out


if __name__ == "__main__":
    main()
