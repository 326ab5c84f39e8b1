"""Where a cold adapter parse's time goes on a CUDA host: allocating fresh pinned memory
(torch.empty(pin_memory=True) -> cudaHostAlloc, or malloc + cudaHostRegister with --register)
against reusing it, alone and from several threads at once, how much a thread's kernel
launches stall meanwhile, and a 7B adapter's parse (host stacking) and raw read (device
stacking) into fresh and reused pinned memory, the raw read also from four threads at once.
Run from the repository root with PYTHONPATH=. ; writes JSON."""
from __future__ import annotations

import argparse
import json
import threading
import time

import torch

from punica_core.adapters import pinned_memory

MB = 1 << 20


def empty_host_cache() -> None:
    """Gives the caching host allocator's free blocks back, so the next ones are fresh."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def fresh_pinned(nbytes: int, count: int) -> float:
    """Seconds per fresh pinned block (kept alive, so the caching allocator cannot reuse)."""
    keep = []
    t0 = time.perf_counter()
    for _ in range(count):
        keep.append(torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
    return (time.perf_counter() - t0) / count


def registered(nbytes: int, count: int) -> float:
    """Seconds per cudaHostRegister of a fresh pageable block (pages touched first)."""
    cudart = torch.cuda.cudart()
    keep, total = [], 0.0
    for _ in range(count):
        t = torch.ones(nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        assert int(cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)) == 0
        total += time.perf_counter() - t0
        keep.append(t)
    for t in keep:
        cudart.cudaHostUnregister(t.data_ptr())
    return total / count


def launch_stall(work, launches: int = 2000) -> dict:
    """Host time per tiny kernel launch while `work` runs on other threads (None: alone)."""
    x = torch.zeros(16, device="cuda")
    torch.cuda.synchronize()
    threads = [threading.Thread(target=w) for w in (work or [])]
    for t in threads:
        t.start()
    times = []
    t_end = time.perf_counter() + 1.0
    while time.perf_counter() < t_end or len(times) < launches:
        t0 = time.perf_counter()
        x.add_(1)
        times.append(time.perf_counter() - t0)
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    times.sort()
    return {"launches": len(times), "p50_us": times[len(times) // 2] * 1e6,
            "p99_us": times[int(len(times) * 0.99)] * 1e6, "max_ms": times[-1] * 1e3}


def parse_times(count: int) -> dict:
    """A rank-16 all-projection Llama-2-7B adapter parsed into pinned memory as the store does:
    kept (fresh pinned memory each time) and then with the earlier ones dropped (reused)."""
    import tempfile

    from punica_core.adapters.random_adapter import write_random_adapter
    from punica_core.adapters.store import AdapterStore
    from punica_core.model.config import NAMED_SHAPES
    cfg = NAMED_SHAPES["llama-2-7b"]
    folder = write_random_adapter(cfg, tempfile.mkdtemp() + "/a", 16)
    store = AdapterStore(cfg, 16, pin_memory=True, dtype=torch.bfloat16)
    out = {}
    for raw in (False, True):       # parsed on the host | read for device stacking
        prefix = "raw_read_" if raw else ""
        for label in ("fresh", "reused"):
            kept, times = [], []
            for _ in range(count):
                t0 = time.perf_counter()
                kept.append(store._parse("a", str(folder), raw=raw))
                times.append((time.perf_counter() - t0) * 1e3)
            out[f"{prefix}{label}_ms"] = times
            del kept
        empty_host_cache()
    # the raw read as the loader workers do it: 4 threads at once, fresh pinned memory
    kept, each = [], []

    def reads():
        for _ in range(count // 4):
            t0 = time.perf_counter()
            kept.append(store._parse("a", str(folder), raw=True))
            each.append((time.perf_counter() - t0) * 1e3)
    out["raw_read_four_threads_wall_s"] = in_four_threads(reads)
    out["raw_read_four_threads_fresh_ms_each"] = each
    return out


def in_four_threads(fn) -> float:
    """Runs fn on four threads at once; seconds until all are done."""
    t0 = time.perf_counter()
    ts = [threading.Thread(target=fn) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=80)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--register", action="store_true",
                    help="switch torch's pinned memory to malloc + cudaHostRegister first "
                         "(what AdapterStore does; punica_core/adapters/pinned_memory.py)")
    ap.add_argument("--out", default="benchmarks/results/diag/pinned_alloc.json")
    args = ap.parse_args()
    n = args.mb * MB
    out = {"device": torch.cuda.get_device_name(), "block_mb": args.mb, "count": args.count,
           "registered_host_memory": args.register and pinned_memory.use_registered_host_memory()}
    pinned_memory.REGISTER_HOST_MEMORY = args.register   # the store in parse_times follows
    torch.empty(1, pin_memory=True)     # CUDA context
    out["fresh_pinned_ms"] = fresh_pinned(n, args.count) * 1e3
    out["fresh_pinned_gb_per_s"] = n / (out["fresh_pinned_ms"] / 1e3) / 1e9
    out["host_register_ms"] = registered(n, args.count) * 1e3
    t0 = time.perf_counter()
    for _ in range(args.count):
        torch.empty(n, dtype=torch.uint8, pin_memory=True)  # freed at once: reused
    out["reused_pinned_ms"] = (time.perf_counter() - t0) / args.count * 1e3
    results = {}

    def allocs():
        results.setdefault("in_threads", []).append(fresh_pinned(n, args.count // 4) * 1e3)
    empty_host_cache()
    out["four_threads_wall_s"] = in_four_threads(allocs)
    out["four_threads_fresh_pinned_ms_each"] = results["in_threads"]
    out["launch_alone"] = launch_stall(None)
    empty_host_cache()
    out["launch_beside_4_pinning_threads"] = launch_stall(
        [lambda: fresh_pinned(n, args.count // 4) for _ in range(4)])
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    pinned = src.pin_memory()
    for label, s in (("pageable", src), ("pinned", pinned)):
        dst.copy_(s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        out[f"h2d_{label}_gb_per_s"] = 5 * n / (time.perf_counter() - t0) / 1e9
    empty_host_cache()
    out["parse"] = parse_times(args.count)
    print(json.dumps(out, indent=1))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
