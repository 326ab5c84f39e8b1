"""Adapter loading on a GPU: host cache -> slot, disk -> slot, and whether loads stall decode.

    python benchmarks/adapter_loading.py --model random:llama-2-7b \
        --out benchmarks/results/adapter_loading_7b.json
    python benchmarks/adapter_loading.py --model random:tiny --device cpu --out /tmp/a.json

For one rank-16 all-projection adapter of the model:
 1. pinned host -> device bandwidth, measured in the same run (a pinned buffer of the bytes a
    slot load copies, non_blocking, CUDA events, median of 20);
 2. host cache -> slot: SlotPool.load of the adapter the store holds (pinned on CUDA), timed
    until the slot is ready; GB/s and the fraction of (1);
 3. disk -> slot: a fresh register (read + parse + validate + pin) until the slot is ready,
    with the file's pages dropped from the page cache first (posix_fadvise) and again warm;
    split into read, parse/validate, pin and slot copy;
 4. no stall: decode steps of a running batch (distinct resident adapters) in alternating
    blocks without and with a load of another adapter issued every --load-every steps.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (adapter_bytes, check_device, config_dict,  # noqa: E402
                               default_adapter_dir, engine_config, ensure_adapters,
                               environment, host_bytes, log, model_shape, pct,
                               pinned_h2d_bandwidth, random_prompts, register_all, renamed,
                               sync, wait_ready, write_json)
from punica_core import Engine, SamplingParams  # noqa: E402
from punica_core.adapters.peft import (WEIGHTS_NAME, parse_adapter,  # noqa: E402
                                       read_adapter_files, read_raw_adapter)

GOAL_DISK_TO_SLOT_MS = 100
GOAL_STALL_FRACTION = 0.10      # decode step p50 with loads within 10% of without
med = statistics.median


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def load_and_wait(pool, adapter) -> tuple[float, float]:
    """(ms to issue SlotPool.load, ms until its slot is ready)."""
    t0 = time.perf_counter()
    slot = pool.load(adapter)
    issued = ms_since(t0)
    if slot is None:
        raise RuntimeError(f"no free slot for {adapter.name!r}: {pool.snapshot()}")
    wait_ready(pool, slot)
    return issued, ms_since(t0)


def host_to_slot(engine, adapter, reps: int, h2d: dict | None) -> dict:
    pool, device = engine.pool, engine.model.device
    issue, total = [], []
    for i in range(reps + 1):                   # the first one warms the copy path up
        sync(device)
        a = renamed(adapter, f"h2s{i}")
        t_issue, t_total = load_and_wait(pool, a)
        pool.evict(a.name)
        if i:
            issue.append(t_issue)
            total.append(t_total)
    hb = host_bytes(adapter)
    sb = adapter_bytes(engine.model.cfg, adapter.rank, adapter.targets,
                       engine.model.dtype.itemsize)
    out = {"reps": reps, "load_ms_each": total, "load_ms_median": med(total),
           "issue_ms_median": med(issue), "host_bytes": hb, "slot_bytes": sb,
           "host_dtype": str(next(iter(adapter.weights.values()))[0].dtype),
           "gb_per_s_host_bytes": hb / med(total) / 1e6,
           "gb_per_s_slot_bytes": sb / med(total) / 1e6}
    if h2d:
        out["fraction_of_pinned_h2d"] = out["gb_per_s_host_bytes"] / h2d["gb_per_s"]
    return out


def drop_page_cache(path: Path) -> bool:
    """Asks the kernel to drop the file's clean pages (no root needed); False if it cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def filesystem(path: Path) -> str:
    """The type of the filesystem holding path (tmpfs pages cannot be dropped: no cold read)."""
    best = ("", "unknown")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            mount, kind = line.split()[1:3]
            if str(path.resolve()).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, kind)
    except OSError:
        pass
    return best[1]


def read_as_store(store, path: Path, fresh_buffer: bool = False) -> float:
    """ms to read the adapter folder the way the store's parse does (its reader, into its kept
    read buffers unless fresh_buffer)."""
    t0 = time.perf_counter()
    if fresh_buffer:
        read_adapter_files(path, store.max_adapter_bytes)
    else:
        with store.read_buffers.lease() as alloc:
            read_adapter_files(path, store.max_adapter_bytes, alloc)
    return ms_since(t0)


def disk_to_slot(engine, name: str, path: Path) -> dict:
    pool, store, cfg = engine.pool, engine.store, engine.config
    weights = path / WEIGHTS_NAME
    out = {"file_bytes": weights.stat().st_size}
    out["page_cache_dropped"] = drop_page_cache(weights)
    out["read_cold_ms"] = read_as_store(store, path)
    out["read_cold_gb_per_s"] = out["file_bytes"] / out["read_cold_ms"] / 1e6
    for label in ("cold", "warm"):
        if label == "cold":
            drop_page_cache(weights)
        sync(engine.model.device)
        t0 = time.perf_counter()
        engine.register_adapter(name, path)
        out[f"register_{label}_ms"] = ms_since(t0)
        _, copy_ms = load_and_wait(pool, store.get_cached(name))
        out[f"slot_copy_{label}_ms"] = copy_ms
        out[f"e2e_{label}_ms"] = ms_since(t0)
        engine.unregister_adapter(name)
    # the warm register, split: read, then parse + validate + fold into the pool's dtype in
    # pinned memory (what the store does; parse_adapter re-reads the file). A read into a
    # fresh buffer (page faults: what the first loads of a process pay) is shown beside.
    out["read_warm_ms"] = read_as_store(store, path)
    out["read_warm_fresh_buffer_ms"] = read_as_store(store, path, fresh_buffer=True)
    pin = store.pin_memory and torch.cuda.is_available()
    t0 = time.perf_counter()
    parse_adapter(name, path, engine.model.cfg, cfg.max_lora_rank, cfg.max_adapter_bytes,
                  dtype=store.dtype, pin_memory=pin, buffers=store.read_buffers)
    out["parse_validate_pin_ms"] = ms_since(t0) - out["read_warm_ms"]
    return out


def disk_to_slot_device_stacked(engine, name: str, path: Path) -> dict:
    """The device-stacking path (EngineConfig.adapter_device_stacking): the file read into a
    pinned buffer (read_raw_adapter), then a slot load that copies the bytes and stacks and
    checks them on the device, until the slot is ready; cold and warm."""
    pool, store, cfg = engine.pool, engine.store, engine.config
    weights = path / WEIGHTS_NAME
    out = {}
    pin = store.pin_memory and torch.cuda.is_available()
    for label in ("cold", "warm"):
        if label == "cold":
            out["page_cache_dropped"] = drop_page_cache(weights)
        sync(engine.model.device)
        t0 = time.perf_counter()
        adapter = read_raw_adapter(f"{name}-{label}", path, engine.model.cfg,
                                   cfg.max_lora_rank, cfg.max_adapter_bytes, pin_memory=pin)
        out[f"read_{label}_ms"] = ms_since(t0)
        issued, copy_ms = load_and_wait(pool, adapter)
        out[f"slot_issue_{label}_ms"] = issued
        out[f"slot_stack_{label}_ms"] = copy_ms
        out[f"e2e_{label}_ms"] = ms_since(t0)
        pool.evict(adapter.name)
    return out


def no_stall(engine, cfg, args, names: list[str], rng) -> dict:
    """Decode steps of a full batch with and without loads of other adapters in between."""
    pool, store = engine.pool, engine.store
    extras = [renamed(store.get_cached(names[k % len(names)]), f"x{k}")
              for k in range(args.extra_slots)]
    measured = 2 * args.blocks * args.block_steps
    params = SamplingParams(max_tokens=args.warm_steps + measured + 8, temperature=0,
                            ignore_eos=True)
    need = len(names) * engine.kv.blocks_needed(args.prompt_len + params.max_tokens)
    if need > engine.kv.allocator.num_blocks:
        sys.exit(f"no stall: the batch needs {need} KV blocks, the cache has "
                 f"{engine.kv.allocator.num_blocks}: raise --kv-cache-gb")
    reqs = [engine.add_request(None, params, n, prompt_ids=p)
            for n, p in zip(names, random_prompts(cfg, len(names), args.prompt_len, rng))]
    while any(not r.output_ids for r in reqs):          # admission and prefill
        engine.step()
    for _ in range(args.warm_steps):
        engine.step()
    rows = {"without": [], "with": []}
    step_ms = {"without": [], "with": []}
    issue_ms, loads0, k = [], pool.loads, 0
    for i in range(measured):
        mode = "with" if (i // args.block_steps) % 2 else "without"
        t_issue = 0.0
        if mode == "with" and i % args.load_every == 0:
            a = extras[k % len(extras)]
            k += 1
            if pool.lookup(a.name) is not None:
                pool.evict(a.name)
            t0 = time.perf_counter()
            if pool.load(a) is None:
                raise RuntimeError(f"no slot for {a.name}: {pool.snapshot()}")
            t_issue = ms_since(t0)
            issue_ms.append(t_issue)
        t0 = time.perf_counter()
        engine.step()
        rows[mode].append(ms_since(t0) + t_issue)
        rec = engine.metrics.recent(1)[0]
        if rec.decode_rows != len(names):
            raise RuntimeError(f"step {i}: {rec.decode_rows} decode rows, expected "
                               f"{len(names)} (a request finished or was preempted)")
        step_ms[mode].append(rec.duration_s * 1e3)
    for a in extras:
        slot = pool.lookup(a.name)
        if slot is not None:
            wait_ready(pool, slot)
    for r in reqs:
        engine.abort(r.id)
    while engine.has_work():
        engine.step()
    out = {"batch": len(names), "blocks_each": args.blocks, "block_steps": args.block_steps,
           "load_every": args.load_every, "loads": pool.loads - loads0,
           "load_issue_ms_median": med(issue_ms) if issue_ms else None,
           "step_ms": step_ms, "iteration_ms": rows,
           "method": "blocks of steps alternate without / with loads; step = the engine's "
                     "step record; iteration = wall time of engine.step() plus issuing the load"}
    for mode in ("without", "with"):
        out[f"step_ms_p50_{mode}"] = pct(step_ms[mode], 50)
        out[f"step_ms_p99_{mode}"] = pct(step_ms[mode], 99)
        out[f"iteration_ms_p50_{mode}"] = pct(rows[mode], 50)
    out["step_p50_with_vs_without"] = out["step_ms_p50_with"] / out["step_ms_p50_without"]
    out["iteration_p50_with_vs_without"] = \
        out["iteration_ms_p50_with"] / out["iteration_ms_p50_without"]
    out["meets_goal"] = out["step_p50_with_vs_without"] <= 1 + GOAL_STALL_FRACTION
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-2-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="running requests in the stall test")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--extra-slots", type=int, default=4,
                    help="slots beyond the batch's, which the stall test's loads cycle through")
    ap.add_argument("--reps", type=int, default=10, help="host -> slot loads timed")
    ap.add_argument("--fresh", type=int, default=3, help="files timed disk -> slot")
    ap.add_argument("--blocks", type=int, default=4, help="stall test: blocks of each kind")
    ap.add_argument("--block-steps", type=int, default=16)
    ap.add_argument("--warm-steps", type=int, default=8)
    ap.add_argument("--load-every", type=int, default=1)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="8 on cuda, 0.25 on cpu")
    ap.add_argument("--adapter-dir", default=None, help="default: shared cache under /tmp")
    ap.add_argument("--out", default="benchmarks/results/adapter_loading.json")
    args = ap.parse_args(argv)
    device = check_device(args.device)
    cfg = model_shape(args.model)
    rng = random.Random(0)
    t_start = time.perf_counter()
    out = {"benchmark": "adapter_loading", "model": args.model, **environment(device),
           "adapter_rank": args.rank, "notes": []}
    names = [f"a{i}" for i in range(args.batch)]
    fresh = [f"fresh{i}" for i in range(args.fresh)]
    paths = ensure_adapters(cfg, Path(args.adapter_dir) if args.adapter_dir
                            else default_adapter_dir(args.model, args.rank), names + fresh,
                            args.rank, list(range(args.batch)) + [10_000 + i for i in
                                                                  range(args.fresh)])
    t0 = time.perf_counter()
    engine = Engine(engine_config(
        model=args.model, device=str(device), max_batch=args.batch,
        max_adapters_on_gpu=args.batch + args.extra_slots, max_lora_rank=args.rank,
        max_tokens_per_step=args.batch * args.prompt_len, max_model_len=4096,
        kv_cache_gb=args.kv_cache_gb or (8 if device.type == "cuda" else 0.25)))
    log(f"model ready in {time.perf_counter() - t0:.1f}s")
    out["engine_config"] = config_dict(engine)
    out["adapter_registration_s"] = register_all(engine, {n: paths[n] for n in names})
    log(f"{len(names)} adapters registered in {out['adapter_registration_s']:.1f}s")
    adapter = engine.store.get_cached(names[0])

    out["pinned_h2d"] = pinned_h2d_bandwidth(device, host_bytes(adapter))
    if out["pinned_h2d"] is None:
        out["notes"].append("pinned_h2d: CUDA only (skipped); on cpu a slot load is a plain "
                            "synchronous copy")
    else:
        log(f"pinned h2d {out['pinned_h2d']['gb_per_s']:.1f} GB/s")
    out["host_to_slot"] = host_to_slot(engine, adapter, args.reps, out["pinned_h2d"])
    log("host -> slot", {k: v for k, v in out["host_to_slot"].items() if k != "load_ms_each"})
    write_json(args.out, {**out, "partial": True})

    files = [disk_to_slot(engine, n, paths[n]) for n in fresh]
    keys = [k for k in files[0] if k.endswith("_ms") and files[0][k] is not None]
    out["disk_to_slot"] = {"files": files, **{f"{k}_median": med(f[k] for f in files)
                                              for k in keys},
                           "goal_ms": GOAL_DISK_TO_SLOT_MS,
                           "filesystem": filesystem(paths[fresh[0]]),
                           "method": "register (read + parse + validate + pin) then "
                                     "SlotPool.load until ready; cold: posix_fadvise "
                                     "DONTNEED on the file first"}
    d = out["disk_to_slot"]
    d["meets_goal_cold"] = d["e2e_cold_ms_median"] <= GOAL_DISK_TO_SLOT_MS
    d["meets_goal_warm"] = d["e2e_warm_ms_median"] <= GOAL_DISK_TO_SLOT_MS
    for label in ("cold", "warm"):      # parsing's share; the rest is the slot copy
        d[f"register_fraction_{label}"] = \
            d[f"register_{label}_ms_median"] / d[f"e2e_{label}_ms_median"]
    log("disk -> slot", {k: v for k, v in d.items() if k != "files"})
    stacked = [disk_to_slot_device_stacked(engine, n, paths[n]) for n in fresh]
    out["disk_to_slot_device_stacked"] = {
        "files": stacked, **{f"{k}_median": med(f[k] for f in stacked)
                             for k in stacked[0] if k.endswith("_ms")},
        "method": "read_raw_adapter (file -> pinned buffer) then SlotPool.load (H2D of the "
                  "file, stacking and NaN check on the device) until ready"}
    log("disk -> slot, device stacked", {k: v for k, v in out["disk_to_slot_device_stacked"]
                                         .items() if k != "files"})
    write_json(args.out, {**out, "partial": True})

    out["no_stall"] = no_stall(engine, cfg, args, names, rng)
    log("no stall", {k: v for k, v in out["no_stall"].items()
                     if k not in ("step_ms", "iteration_ms")})
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    engine.close()
    h = out["host_to_slot"]
    out["ratios"] = {
        "slot_load_vs_pinned_h2d": h.get("fraction_of_pinned_h2d"),
        "disk_to_slot_cold_ms": d["e2e_cold_ms_median"],
        "disk_to_slot_warm_ms": d["e2e_warm_ms_median"],
        # the path of background reads (lazy adapters, re-reads) on CUDA by default
        "disk_to_slot_device_stacked_cold_ms":
            out["disk_to_slot_device_stacked"]["e2e_cold_ms_median"],
        "disk_to_slot_device_stacked_warm_ms":
            out["disk_to_slot_device_stacked"]["e2e_warm_ms_median"],
        "no_stall_step_p50_with_vs_without": out["no_stall"]["step_p50_with_vs_without"],
        "no_stall_iteration_p50_with_vs_without":
            out["no_stall"]["iteration_p50_with_vs_without"]}
    out["private_apis_used"] = []      # SlotPool.load/is_ready/evict, AdapterStore.get_cached
    out["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
