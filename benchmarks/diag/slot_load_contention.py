"""What slows the engine thread's slot loads (SlotPool.load of a raw 7B adapter: the device
stacking, ~50 torch calls) while background threads work as the adapter loaders do: pure
Python (the header check), fresh pinned allocations, reads into pinned memory without Python,
and the real raw read (read_raw_adapter) with and without the plan memo. Each case: four
background threads for a few seconds while the main thread loads slots and times 20 tiny
kernel launches after each load. Run from the repository root with PYTHONPATH=. on a CUDA
host; writes JSON (per case: loads done, wall and thread-CPU ms per load, ms per launch)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import torch

from benchmarks.common import default_adapter_dir, ensure_adapters, environment
from punica_core.adapters import peft, pinned_memory
from punica_core.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, read_raw_adapter
from punica_core.adapters.plan_memo import PlanMemo
from punica_core.adapters.slots import SlotPool
from punica_core.adapters.weights_reader import read_weights_file
from punica_core.model.config import NAMED_SHAPES

CFG = NAMED_SHAPES["llama-2-7b"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.5, help="per case")
    ap.add_argument("--threads", type=int, default=4, help="background threads per case")
    ap.add_argument("--out", default="benchmarks/results/diag/slot_load_contention_h200.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    registered = pinned_memory.use_registered_host_memory()   # as the engine's store does
    names = [f"a{i}" for i in range(8)]
    paths = ensure_adapters(CFG, default_adapter_dir("random:llama-2-7b", 16), names, 16,
                            list(range(8)))
    dev = torch.device("cuda")
    pool = SlotPool(CFG, 8, 16, torch.bfloat16, dev)
    raws = [read_raw_adapter(n, paths[n], CFG, 16, pin_memory=True) for n in names]
    raw_cfg = (paths[names[0]] / CONFIG_NAME).read_bytes()
    head = (paths[names[0]] / WEIGHTS_NAME).read_bytes()
    stop = threading.Event()

    def python_only():          # the header check without the memo: pure Python
        while not stop.is_set():
            peft._check_plan("x", json.loads(raw_cfg), head, "x", CFG, 16, None)

    def fresh_pinned():         # new 80 MB pinned blocks, nothing else
        kept = []
        while not stop.is_set():
            kept.append(torch.empty(80 << 20, dtype=torch.uint8, pin_memory=True))
            if len(kept) > 12:
                kept.clear()
                torch._C._host_emptyCache()

    def pinned_reads():         # file reads into one reused pinned buffer, no Python check
        buf = torch.empty(96 << 20, dtype=torch.uint8, pin_memory=True)
        i = 0
        while not stop.is_set():
            read_weights_file(paths[names[i % 8]] / WEIGHTS_NAME, 1 << 30, lambda n: buf[:n])
            i += 1

    def raw_reads():            # what a loader thread does (device stacking)
        i = 0
        while not stop.is_set():
            read_raw_adapter("x", paths[names[i % 8]], CFG, 16, pin_memory=True)
            i += 1

    def measure(target, seconds):
        stop.clear()
        threads = [threading.Thread(target=target, daemon=True)
                   for _ in range(args.threads if target else 0)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        walls, cpus, launch = [], [], []
        x = torch.zeros(16, device=dev)
        end, i = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            for s in range(pool.num_slots):
                if pool._name_of[s]:
                    pool.evict(pool._name_of[s])
            t0, c0 = time.perf_counter(), time.thread_time()
            pool.load(raws[i % len(raws)])
            walls.append((time.perf_counter() - t0) * 1e3)
            cpus.append((time.thread_time() - c0) * 1e3)
            t0 = time.perf_counter()
            for _ in range(20):
                x.add_(1)
            launch.append((time.perf_counter() - t0) * 1e3 / 20)
            torch.cuda.synchronize()
            i += 1
        stop.set()
        for t in threads:
            t.join()

        def q(v):
            return {"p50": statistics.median(v), "p90": sorted(v)[int(len(v) * 0.9)]}
        return {"loads": len(walls), "load_wall_ms": q(walls), "load_cpu_ms": q(cpus),
                "tiny_launch_ms": q(launch)}

    out = {"environment": environment(dev), "registered_host_memory": registered,
           "background_threads": args.threads, "seconds_per_case": args.seconds, "cases": {}}
    measure(None, 1.0)      # warm-up
    memo = peft._PLANS
    cases = [("idle", None, memo), ("python_header_check", python_only, memo),
             ("fresh_pinned_allocations", fresh_pinned, memo),
             ("pinned_reads_no_python", pinned_reads, memo),
             ("raw_reads_with_plan_memo", raw_reads, memo),
             ("raw_reads_without_plan_memo", raw_reads, PlanMemo(size=0))]
    for label, target, plans in cases:
        peft._PLANS = plans
        out["cases"][label] = r = measure(target, args.seconds)
        print(f"{label:30s} loads {r['loads']:4d} wall p50 {r['load_wall_ms']['p50']:7.2f} ms "
              f"cpu p50 {r['load_cpu_ms']['p50']:6.2f} ms launch p50 "
              f"{r['tiny_launch_ms']['p50']:6.3f} ms", flush=True)
    peft._PLANS = memo
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
