"""Helpers shared by the GPU benchmarks (engine_gpu.py, adapter_loading.py).

Every measurement here also runs on CPU (smaller sizes, for the smoke test); what only CUDA
can measure returns None and the callers say so in their JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Run as `python benchmarks/x.py`, Python puts benchmarks/ first on sys.path, where kernels.py
# shadows Hugging Face's `kernels` package, which transformers (5.x) imports when it is
# installed ("cannot import name 'CUDAProperties' from 'kernels'"). The scripts import their
# siblings as `benchmarks.*`, so benchmarks/ comes off the path and the repository root goes on.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from punica_core import EngineConfig, SamplingParams  # noqa: E402
from punica_core.adapters.random_adapter import ALL_PROJECTIONS, write_random_adapter  # noqa
from punica_core.model.config import NAMED_SHAPES  # noqa: E402

GIB = 2**30


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def model_shape(spec: str):
    if not spec.startswith("random:") or spec.split(":", 1)[1] not in NAMED_SHAPES:
        sys.exit(f"--model must be random:NAME with NAME in {', '.join(NAMED_SHAPES)}; "
                 f"got {spec!r}")
    return NAMED_SHAPES[spec.split(":", 1)[1]]


def check_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no GPU (use --device cpu for the small CPU run)")
    return device


def environment(device) -> dict:
    device = torch.device(device)
    out = {"torch": torch.__version__, "device_type": device.type,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(cuda=torch.version.cuda, device_memory_gib=props.total_memory / GIB)
    return out


def engine_config(**kw) -> EngineConfig:
    """EngineConfig(**kw) without the keys this checkout's EngineConfig does not have (printed;
    e.g. flags that land while the benchmarks are written)."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    for k in [k for k in kw if k not in known]:
        log(f"note: EngineConfig has no field {k!r}; ignored")
        del kw[k]
    return EngineConfig(**kw)


def has_config_field(name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(EngineConfig)}


def config_dict(engine) -> dict:
    return {k: v for k, v in dataclasses.asdict(engine.config).items()
            if isinstance(v, (int, float, str, bool, type(None)))}


# -- bandwidths --------------------------------------------------------------------------------

def _time_ms(fn, device, reps: int) -> list[float]:
    """Wall (CPU) or CUDA-event time of fn() in ms, each of `reps` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device, nbytes: int, reps: int = 10) -> dict:
    """Device-to-device copy of nbytes; bandwidth counts read + write (2 * nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    times = _time_ms(lambda: dst.copy_(src), device, reps)
    del src, dst
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    ms = statistics.median(times)
    return {"bytes": nbytes, "bytes_counted": 2 * nbytes, "reps": reps, "ms_each": times,
            "ms_median": ms, "gb_per_s": 2 * nbytes / ms / 1e6,
            "method": "torch copy_ of a uint8 tensor, read + write bytes, median"}


def pinned_h2d_bandwidth(device, nbytes: int, reps: int = 20) -> dict | None:
    """Pinned host -> device copy (non_blocking, CUDA events); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = _time_ms(lambda: dst.copy_(src, non_blocking=True), device, reps)
    del src, dst
    ms = statistics.median(times)
    return {"bytes": nbytes, "reps": reps, "ms_each": times, "ms_median": ms,
            "gb_per_s": nbytes / ms / 1e6}


# -- adapters ----------------------------------------------------------------------------------

def adapter_bytes(cfg, rank: int, targets=ALL_PROJECTIONS, elem_size: int = 2) -> int:
    """Bytes of one adapter's A and B at its real rank (what a kernel reads per step)."""
    return cfg.num_layers * rank * sum(sum(cfg.proj_shapes[p]) for p in targets) * elem_size


def host_bytes(adapter) -> int:
    """Bytes of a parsed adapter's host tensors (what a slot load copies)."""
    return sum(t.numel() * t.element_size() for ab in adapter.weights.values() for t in ab)


def default_adapter_dir(model: str, rank: int) -> Path:
    """Shared by both benchmarks, so the second run of a session writes nothing."""
    root = Path(os.environ.get("PUNICA_BENCH_ADAPTERS", "/tmp/punica-bench-adapters"))
    return root / f"{model.replace(':', '-')}-r{rank}"


def ensure_adapters(cfg, root: Path, names: list[str], rank: int, seeds: list[int],
                    threads: int = 8) -> dict[str, Path]:
    """Random all-projection PEFT adapters root/NAME (written in parallel; an existing,
    complete folder is reused: a folder is renamed into place only once written)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {n: root / n for n in names}
    todo = [(n, s) for n, s in zip(names, seeds)
            if not (paths[n] / "adapter_config.json").is_file()]

    def write(item):
        name, seed = item
        tmp = root / f".{name}.tmp{os.getpid()}"
        write_random_adapter(cfg, tmp, rank, ALL_PROJECTIONS, seed=seed)
        tmp.rename(paths[name])

    t0 = time.perf_counter()
    if todo:
        with ThreadPoolExecutor(min(threads, len(todo))) as ex:
            list(ex.map(write, todo))
    log(f"adapters: {len(todo)} written, {len(names) - len(todo)} reused, in {root}, "
        f"{time.perf_counter() - t0:.1f}s")
    return paths


def register_all(engine, paths: dict[str, Path], threads: int = 8) -> float:
    """Registers (parses, validates, pins) every adapter, in parallel; returns seconds."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(min(threads, max(1, len(paths)))) as ex:
        list(ex.map(lambda kv: engine.register_adapter(*kv), paths.items()))
    return time.perf_counter() - t0


def renamed(adapter, name: str):
    """The same parsed adapter (weights shared, not copied) under another name."""
    return dataclasses.replace(adapter, name=name)


def wait_ready(pool, slot: int, timeout_s: float = 30.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not pool.is_ready(slot):
        if time.perf_counter() > deadline:
            raise RuntimeError(f"slot {slot} not ready after {timeout_s}s")


# -- running requests --------------------------------------------------------------------------

def random_prompts(cfg, n: int, length: int, rng) -> list[list[int]]:
    return [[rng.randrange(3, cfg.vocab_size) for _ in range(length)] for _ in range(n)]


def run_requests(engine, prompts, adapters, new_tokens, timeout_s: float = 600.0) -> dict:
    """Submits every request at once, steps until all finish. new_tokens: an int or one per
    request. tokens/s counts generated tokens over the wall time (prefill included); decode
    step times come from the engine's step records (steps without prefill tokens)."""
    counts = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    device = engine.model.device
    steps_before = engine.metrics.counters["steps"]
    counters_before = dict(engine.metrics.counters)
    sync(device)
    t0, wall0 = time.perf_counter(), time.time()
    reqs = [engine.add_request(None, SamplingParams(max_tokens=n, temperature=0,
                                                    ignore_eos=True),
                               a, prompt_ids=p, enforce_queue_limit=False)
            for p, a, n in zip(prompts, adapters, counts)]
    while engine.has_work():
        engine.step()
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"requests not done after {timeout_s}s: {engine.status()}")
    sync(device)
    dt = time.perf_counter() - t0
    bad = [(r.finish_reason, r.error) for r in reqs if r.finish_reason != "length"]
    if bad:
        raise RuntimeError(f"{len(bad)} request(s) did not finish normally: {bad[:3]}")
    n_steps = engine.metrics.counters["steps"] - steps_before
    steps = engine.metrics.recent(n_steps)
    decode = [s.duration_s * 1e3 for s in steps if s.prefill_tokens == 0]
    prefill = [s.duration_s * 1e3 for s in steps if s.prefill_tokens > 0]
    # where the wall time goes: decode steps, steps with prefill tokens, and outside steps
    # (scheduling, admission, waiting for adapter loads)
    return {"tokens_per_s": sum(len(r.output_ids) for r in reqs) / dt, "seconds": dt,
            "requests": len(reqs), "tokens": sum(len(r.output_ids) for r in reqs),
            "steps": n_steps, "decode_steps": len(decode),
            "decode_step_ms_p50": pct(decode, 50), "decode_step_ms_p99": pct(decode, 99),
            "decode_steps_s": sum(decode) / 1e3, "prefill_steps": len(prefill),
            "prefill_tokens": sum(s.prefill_tokens for s in steps),
            "prefill_step_ms_p50": pct(prefill, 50), "prefill_step_ms_max": max(prefill, default=None),
            "prefill_steps_s": sum(prefill) / 1e3,
            "outside_steps_s": dt - (sum(decode) + sum(prefill)) / 1e3,
            # ... of which scheduling (with the slot loads issued while nothing runs) and
            # nothing runnable
            **{f"outside_{k}": engine.metrics.counters[k] - counters_before.get(k, 0)
               for k in ("schedule_s", "idle_waiting_s")},
            # slot loads issued while the GPU computed a step (inside the steps' time)
            "in_steps_load_ahead_s": engine.metrics.counters["load_ahead_in_step_s"]
            - counters_before.get("load_ahead_in_step_s", 0),
            "gaps_between_steps": step_gaps(steps, wall0),
            "distinct_adapters": len({a for a in adapters if a})}


def step_gaps(steps, wall0: float, longest: int = 8) -> dict:
    """When the engine was not in a step: the wait before the first step, the gaps of 5 ms or
    more (their count and total), and the longest few with the running batch and queue depth
    of the step before them (t_s: seconds after the requests were submitted)."""
    if not steps:
        return {}
    gaps = [{"t_s": a.time - wall0, "gap_s": (b.time - b.duration_s) - a.time,
             "running_before": a.running, "queue_depth_before": a.queue_depth}
            for a, b in zip(steps, steps[1:])]
    big = [g for g in gaps if g["gap_s"] >= 0.005]
    return {"before_first_step_s": steps[0].time - steps[0].duration_s - wall0,
            "gaps_5ms_or_more": len(big), "gaps_5ms_or_more_s": sum(g["gap_s"] for g in big),
            "longest": sorted(big, key=lambda g: -g["gap_s"])[:longest]}


def warm_up(engine, cfg, batch: int, adapter: str | None, rng) -> None:
    """Decodes with every batch size from `batch` down to 1 (request i stops after i + 1
    tokens), with and without `adapter`: every size-dependent path (CUDA graph buckets,
    cuBLAS heuristics) is built before anything is timed."""
    prompts = random_prompts(cfg, batch, 8, rng)
    for a in dict.fromkeys([None, adapter]):
        run_requests(engine, prompts, [a] * batch, [i + 1 for i in range(batch)])


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    log(f"wrote {path}")
