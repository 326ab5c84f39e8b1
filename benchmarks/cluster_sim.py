"""Punica's cluster scheduler, simulated: many GPUs (16 to 64), Poisson arrivals, Punica's
adapter popularity mixes, a step-latency model measured from our engine.

    python benchmarks/cluster_sim.py --measure            # fit the step model on this machine
    python benchmarks/cluster_sim.py                      # simulate with the fitted model

Each simulated GPU runs one engine: continuous batching up to max_batch requests; a step takes
    t = a + b * batch + c * distinct_adapters + p * prefill_tokens (+ load_s per adapter load)
seconds, with (a, b, c, p) fitted from decode and prefill steps of punica_core's Engine. KV
memory is counted in tokens; when a GPU runs out mid-generation its newest request migrates
(recomputed there with one prefill), exactly as punica_core.cluster does. Requests are placed by
the *same policy code* as the real router (punica_core.cluster.policy): Punica's consolidation,
round-robin, least-loaded; what fits nowhere waits in one FCFS queue.

Reported per (mix, GPUs, load, policy): GPUs in use over time (a GPU is in use while it holds a
request; the others could be released), throughput, per-token latency and TTFT, migrations; and
per mix the GPUs each policy keeps in use where it meets a latency target. JSON + a plot.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from punica_core.cluster.policy import EngineView, make_policy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MIXES = ("distinct", "uniform", "skewed", "identical")
POLICIES = ("punica", "round_robin", "least_loaded")


# -- the step-latency model, measured ----------------------------------------------------------
def measure_step_model(model: str, device: str | None, batches: list[int], rank: int,
                       threads: int, decode_steps: int = 16) -> dict:
    import torch

    from punica_core import Engine, EngineConfig, SamplingParams
    from punica_core.adapters.random_adapter import write_random_adapter
    torch.set_num_threads(threads)
    bmax = max(batches)
    eng = Engine(EngineConfig(model=model, device=device, max_batch=bmax,
                              max_adapters_on_gpu=bmax, max_tokens_per_step=8192,
                              kv_cache_gb=16.0 if device == "cuda" else 1.0))
    sync = (lambda: torch.cuda.synchronize()) if eng.model.device.type == "cuda" else (lambda: 0)
    tmp = Path(tempfile.mkdtemp(prefix="cluster-sim-adapters-"))
    for i in range(bmax):
        eng.register_adapter(f"a{i}", write_random_adapter(eng.model.cfg, tmp / f"a{i}", rank,
                                                           seed=i))
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)

    def timed_step() -> float:
        sync()
        t0 = time.perf_counter()
        eng.step()
        sync()
        return time.perf_counter() - t0

    def drain(reqs):
        for r in reqs:
            eng.abort(r.id)
        while eng.has_work():
            eng.step()

    points = []
    for mode in ("none", "identical", "distinct"):
        for b in batches:
            names = {"none": [None] * b, "identical": ["a0"] * b,
                     "distinct": [f"a{i}" for i in range(b)]}[mode]
            reqs = [eng.add_request(None, params, n, prompt_ids=[(7 * i + j) % 1000 + 10
                                                                   for j in range(16)],
                                    stream=False) for i, n in enumerate(names)]
            for _ in range(200):                # prefill and adapter loads first
                eng.step()
                if all(r.num_computed >= len(r.prompt_ids) for r in reqs):
                    break
            for _ in range(3):                  # warm-up steps, not timed
                eng.step()
            times = [timed_step() for _ in range(decode_steps)]
            drain(reqs)
            d = {"none": 0, "identical": 1, "distinct": b}[mode]
            points.append({"mode": mode, "batch": b, "distinct": d,
                           "step_s": statistics.median(times)})
            print(f"  {mode:9s} batch {b:3d}: {points[-1]['step_s'] * 1e3:7.2f} ms", flush=True)
    prefill = []
    for n in (32, 512):
        ts = []
        for rep in range(4):                    # the first of each shape warms up
            r = eng.add_request(None, SamplingParams(max_tokens=2), None,
                                prompt_ids=[(5 * j + rep) % 1000 + 10 for j in range(n)],
                                stream=False)
            ts.append(timed_step())
            drain([r])
        prefill.append((n, statistics.median(ts[1:])))
    eng.close()
    fit, err = fit_step_model(points, prefill)
    return {"source": f"measured by benchmarks/cluster_sim.py --measure: punica_core Engine, "
                      f"model {model!r}, device {eng.model.device}, {threads} torch thread(s), "
                      f"rank-{rank} adapters on all projections",
            "model": model, "device": str(eng.model.device), "machine": platform.processor()
            or platform.machine(), "torch_threads": threads, "rank": rank,
            "points": points, "prefill_points": [{"tokens": n, "step_s": t} for n, t in prefill],
            "fit": fit, "fit_max_rel_error": err}


def fit_step_model(points: list[dict], prefill: list[tuple[int, float]]) -> tuple[dict, float]:
    """Least squares over the adapter points (every simulated request uses an adapter):
    t = a + b * batch + c * distinct; p from the two prefill sizes."""
    pts = [q for q in points if q["mode"] != "none"]
    X = np.array([[1.0, q["batch"], q["distinct"]] for q in pts])
    y = np.array([q["step_s"] for q in pts])
    (a, b, c), *_ = np.linalg.lstsq(X, y, rcond=None)
    fit = {"a": float(max(a, 0.0)), "b": float(max(b, 0.0)), "c": float(max(c, 0.0))}
    (n0, t0), (n1, t1) = prefill
    fit["p"] = float(max((t1 - t0) / (n1 - n0), 0.0))
    pred = X @ np.array([fit["a"], fit["b"], fit["c"]])
    return fit, float(np.max(np.abs(pred - y) / y))


# -- workload ----------------------------------------------------------------------------------
def workload(mix: str, rate: float, duration: float, seed: int, max_len: int = 1024):
    """Poisson arrivals; prompt and output lengths log-normal (medians 128 and 192 tokens,
    capped), adapters by Punica's popularity mixes."""
    rng = np.random.default_rng(seed)
    n = max(1, rng.poisson(rate * duration))
    arrivals = np.sort(rng.uniform(0.0, duration, n))
    prompts = np.clip(rng.lognormal(math.log(128), 0.8, n), 8, max_len).astype(int)
    outputs = np.clip(rng.lognormal(math.log(192), 0.8, n), 8, max_len).astype(int)
    n_adapters = max(1, round(math.sqrt(n)))
    if mix == "distinct":
        adapters = np.arange(n)
    elif mix == "uniform":
        adapters = rng.integers(0, n_adapters, n)
    elif mix == "skewed":           # Zipf with alpha 1.5 over n_adapters adapters
        w = 1.0 / np.arange(1, n_adapters + 1) ** 1.5
        adapters = rng.choice(n_adapters, n, p=w / w.sum())
    elif mix == "identical":
        adapters = np.zeros(n, dtype=int)
    else:
        raise ValueError(mix)
    return [(float(t), int(pl), int(ol), f"lora{int(a)}")
            for t, pl, ol, a in zip(arrivals, prompts, outputs, adapters)]


# -- the simulator -----------------------------------------------------------------------------
class SimRequest:
    __slots__ = ("id", "arrival", "prompt", "out", "adapter", "gen", "first", "end",
                 "migrations", "k", "ctx0", "gpu", "epoch")

    def __init__(self, i, arrival, prompt, out, adapter):
        self.id, self.arrival, self.prompt, self.out, self.adapter = i, arrival, prompt, out, adapter
        self.gen = 0                # tokens generated before its current admission
        self.first = self.end = None
        self.migrations = 0
        self.k = -1                 # step index of its current admission
        self.ctx0 = 0
        self.gpu = None
        self.epoch = 0              # bumped when it moves: stale finish events are ignored


class SimGPU:
    def __init__(self, gid, cfg):
        self.id, self.cfg = gid, cfg
        self.running: OrderedDict[int, SimRequest] = OrderedDict()     # admission order
        self.pending: list[SimRequest] = []
        self.pending_kv = 0         # KV tokens the pending requests need
        self.new: list[SimRequest] = []     # admitted in the step now running
        self.step = 0               # index of the step now running (or next)
        self.S = 0                  # sum over running of (ctx0 - k); KV used = S + B * step
        self.finishes: list = []    # heap (finish step, req id, epoch)
        self.adapters_running: Counter = Counter()
        self.resident: OrderedDict[str, None] = OrderedDict()   # adapter slots, LRU
        self.busy = False           # a step is scheduled
        self.full = False           # ran out of KV: nothing new until a request leaves

    @property
    def load(self) -> int:
        return len(self.running) + len(self.pending)

    def kv_committed(self) -> int:
        return self.S + len(self.running) * (self.step + 1) + self.pending_kv

    def view(self) -> EngineView:
        held = frozenset(self.resident) | frozenset(self.adapters_running)
        return EngineView(self.id, self.load, self.cfg["max_batch"],
                          self.cfg["kv_tokens"] - self.kv_committed(), held,
                          accepting=not self.full)


class Simulator:
    def __init__(self, n_gpus: int, policy: str, model: dict, max_batch: int, kv_tokens: int,
                 slots: int, load_s: float):
        self.cfg = {"max_batch": max_batch, "kv_tokens": kv_tokens, "slots": slots}
        self.gpus = [SimGPU(i, self.cfg) for i in range(n_gpus)]
        self.policy = make_policy(policy)
        self.m = model
        self.load_s = load_s
        self.queue: deque[SimRequest] = deque()
        self.events: list = []
        self.now = 0.0
        self.in_use_changes: list[tuple[float, int]] = [(0.0, 0)]
        self.in_use = 0
        self.migrations = 0
        self.seq = 0

    def push(self, t, kind, payload):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    # placement -----------------------------------------------------------------------------
    def choose(self, r: SimRequest, exclude=None) -> SimGPU | None:
        views = [g.view() for g in self.gpus if g.id != exclude]
        gid = self.policy.choose(views, r.prompt + r.gen + 1, r.adapter)
        return None if gid is None else self.gpus[gid]

    def place(self, r: SimRequest, exclude=None, front=False):
        g = None if (self.queue and not front) else self.choose(r, exclude)
        if g is None:
            (self.queue.appendleft if front else self.queue.append)(r)
        else:
            self.assign(g, r)

    def drain_queue(self):
        while self.queue:
            g = self.choose(self.queue[0])
            if g is None:
                return
            self.assign(g, self.queue.popleft())

    def assign(self, g: SimGPU, r: SimRequest):
        was = g.load
        g.pending.append(r)
        g.pending_kv += r.prompt + r.gen + 1
        r.gpu = g.id
        if was == 0:
            self.set_in_use(+1)
        if not g.busy:
            g.busy = True
            self.push(self.now, "step", g.id)

    def set_in_use(self, d):
        self.in_use += d
        self.in_use_changes.append((self.now, self.in_use))

    # one engine step -----------------------------------------------------------------------
    def start_step(self, g: SimGPU):
        """Admits pending requests, migrates on KV exhaustion, schedules the step's end."""
        prefill = loads = 0
        for r in g.pending:
            r.k, r.ctx0 = g.step, r.prompt + r.gen
            g.running[r.id] = r
            g.S += r.ctx0 - r.k
            prefill += r.ctx0
            g.adapters_running[r.adapter] += 1
            if r.adapter in g.resident:
                g.resident.move_to_end(r.adapter)
            else:
                loads += 1
                g.resident[r.adapter] = None
                while len(g.resident) > self.cfg["slots"]:
                    victim = next((a for a in g.resident if a not in g.adapters_running), None)
                    if victim is None:
                        break
                    del g.resident[victim]
            heapq.heappush(g.finishes, (r.k + r.out - r.gen - 1, r.id, r.epoch))
        g.new, g.pending, g.pending_kv = g.pending, [], 0
        # KV for this step's tokens: the newest requests migrate while it does not fit
        while g.running and g.S + len(g.running) * (g.step + 1) > self.cfg["kv_tokens"]:
            _, r = g.running.popitem()
            self.leave(g, r)
            r.gen += g.step - r.k       # tokens it made here (this step's is not made)
            r.epoch += 1
            r.migrations += 1
            self.migrations += 1
            g.full = True
            self.place(r, exclude=g.id, front=True)
        if not g.running:
            g.busy = False
            if g.load == 0:
                self.set_in_use(-1)
            return
        m = self.m
        d = len(g.adapters_running)
        dt = m["a"] + m["b"] * len(g.running) + m["c"] * d + m["p"] * prefill + self.load_s * loads
        self.push(self.now + dt, "end", g.id)

    def leave(self, g: SimGPU, r: SimRequest):
        g.S -= r.ctx0 - r.k
        g.adapters_running[r.adapter] -= 1
        if not g.adapters_running[r.adapter]:
            del g.adapters_running[r.adapter]

    def end_step(self, g: SimGPU):
        for r in g.new:
            if r.first is None and r.id in g.running:
                r.first = self.now
        g.new = []
        done = False
        while g.finishes and g.finishes[0][0] <= g.step:
            _, rid, epoch = heapq.heappop(g.finishes)
            r = g.running.get(rid)
            if r is None or r.epoch != epoch:
                continue
            del g.running[rid]
            self.leave(g, r)
            r.end, r.gpu = self.now, None
            g.full = False
            done = True
        g.step += 1
        if done:
            self.drain_queue()
        if g.running or g.pending:
            self.start_step(g)
        else:
            g.busy = False
            self.set_in_use(-1)

    def run(self, reqs: list[SimRequest]) -> None:
        for r in reqs:
            self.push(r.arrival, "arrive", r)
        while self.events:
            self.now, _, kind, x = heapq.heappop(self.events)
            if kind == "arrive":
                self.place(x)
            elif kind == "step":
                self.start_step(self.gpus[x])
            else:
                self.end_step(self.gpus[x])


def simulate(mix, n_gpus, rate, duration, policy, model, args, seed) -> dict:
    reqs = [SimRequest(i, *w) for i, w in enumerate(workload(mix, rate, duration, seed))]
    sim = Simulator(n_gpus, policy, model, args.max_batch, args.kv_tokens, args.slots,
                    args.adapter_load_s)
    t0 = time.perf_counter()
    sim.run(reqs)
    wall = time.perf_counter() - t0
    # time-weighted GPUs in use over [0, duration] (arrivals stop there; the tail drains)
    ch = sim.in_use_changes + [(max(duration, sim.now), 0)]
    area = sum((min(t1, duration) - min(t0_, duration)) * k
               for (t0_, k), (t1, _) in zip(ch, ch[1:]))
    series = []
    k = 0
    for s in np.arange(0.0, duration, duration / 120):
        while k + 1 < len(ch) and ch[k + 1][0] <= s:
            k += 1
        series.append([round(float(s), 2), ch[k][1]])
    in_use_sorted = sorted(n for _, n in series)
    tpot = [(r.end - r.arrival) / r.out for r in reqs]
    ttft = [r.first - r.arrival for r in reqs]
    tokens = sum(r.out for r in reqs)
    return {"mix": mix, "gpus": n_gpus, "rate_rps": rate, "policy": policy,
            "requests": len(reqs), "gpus_in_use_mean": area / duration,
            "gpus_in_use_p95": in_use_sorted[int(0.95 * (len(in_use_sorted) - 1))],
            "gpus_in_use_max": max(n for _, n in ch),
            "throughput_tok_s": tokens / max(r.end for r in reqs),
            "latency_per_token_ms_p50": 1e3 * float(np.percentile(tpot, 50)),
            "latency_per_token_ms_p99": 1e3 * float(np.percentile(tpot, 99)),
            "ttft_ms_p50": 1e3 * float(np.percentile(ttft, 50)),
            "ttft_ms_p99": 1e3 * float(np.percentile(ttft, 99)),
            "migrations": sim.migrations, "sim_wall_s": round(wall, 2),
            "gpus_in_use_series": series}


def _task(t):
    mix, n, rate, duration, pol, model, args, seed, load = t
    r = simulate(mix, n, rate, duration, pol, model, args, seed)
    r["load"] = load
    r["latency_target_ms"] = 1e3 * args.latency_slack * step_time(
        model, args.max_batch, expected_distinct(mix, args.max_batch, r["requests"]))
    r["meets_target"] = r["latency_per_token_ms_p99"] <= r["latency_target_ms"]
    return r


def _report(r):
    print(f"{r['mix']:9s} {r['gpus']:3d} GPUs load {r['load']:.2f} {r['policy']:12s}: in use "
          f"{r['gpus_in_use_mean']:5.1f} (p95 {r['gpus_in_use_p95']:3d}), "
          f"{r['throughput_tok_s']:8.0f} tok/s, p50/p99 {r['latency_per_token_ms_p50']:7.1f}/"
          f"{r['latency_per_token_ms_p99']:7.1f} ms/token (target "
          f"{r['latency_target_ms']:.0f}), migrations {r['migrations']}, {r['sim_wall_s']}s",
          flush=True)
    return r


def step_time(model, batch, distinct):
    return model["a"] + model["b"] * batch + model["c"] * distinct


def expected_distinct(mix, batch, n_requests):
    return {"distinct": batch, "identical": 1}.get(mix, min(batch, round(math.sqrt(n_requests))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="measure the step model first")
    ap.add_argument("--model", default="default", help="model measured (default: default)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--step-model", default=str(RESULTS / "cluster_sim_step_model_h100.json"),
                    help="JSON with the fitted step model (written by --measure)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--loads", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8],
                    help="offered load as a fraction of the fleet's full-batch capacity")
    ap.add_argument("--mixes", nargs="+", default=list(MIXES))
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of arrivals (default: 15 mean request lifetimes)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--kv-tokens", type=int, default=32768, help="KV tokens per GPU")
    ap.add_argument("--slots", type=int, default=32, help="adapter slots per GPU")
    ap.add_argument("--adapter-load-s", type=float, default=0.002)
    ap.add_argument("--latency-slack", type=float, default=1.5,
                    help="latency target: p99 per-token latency <= slack x a full batch's step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="simulations run in parallel")
    ap.add_argument("--out", default=str(RESULTS / "cluster_sim.json"))
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a results JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.plot_only).with_suffix(".png"))
        return

    if args.measure:
        print(f"measuring the step model ({args.model}) ...", flush=True)
        sm = measure_step_model(args.model, args.device, args.batches, 16, args.threads)
        Path(args.step_model).write_text(json.dumps(sm, indent=2))
        print(f"fit: {sm['fit']}  -> {args.step_model}")
    sm = json.loads(Path(args.step_model).read_text())
    sm["fit"], sm["fit_max_rel_error"] = fit_step_model(   # the fit rule lives in one place
        sm["points"], [(q["tokens"], q["step_s"]) for q in sm["prefill_points"]])
    model = sm["fit"]
    mean_out = 192 * math.exp(0.8 ** 2 / 2)        # of the log-normal output lengths
    results, summary, tasks = [], {}, []
    for mix in args.mixes:
        for n in args.gpus:
            full = step_time(model, args.max_batch, expected_distinct(mix, args.max_batch,
                                                                      10_000))
            lifetime = mean_out * full
            duration = args.duration or 15 * lifetime
            for load in args.loads:
                rate = load * n * args.max_batch / lifetime
                for pol in args.policies:
                    tasks.append((mix, n, rate, duration, pol, model, args, args.seed, load))
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            done = pool.imap(_task, tasks)
            results = [_report(r) for r in done]
    else:
        results = [_report(_task(t)) for t in tasks]
    # per mix and fleet: GPUs in use where every policy meets the latency target
    for mix in args.mixes:
        for n in args.gpus:
            rows = [r for r in results if r["mix"] == mix and r["gpus"] == n]
            loads = [ld for ld in args.loads if all(r["meets_target"] for r in rows
                                                    if r["load"] == ld)]
            per = {p: [round(r["gpus_in_use_mean"], 2) for r in rows
                       if r["policy"] == p and r["load"] in loads] for p in args.policies}
            summary[f"{mix}/{n}"] = {
                "loads_meeting_target": loads,
                "gpus_in_use_mean": per,
                "punica_vs_round_robin": [round(a / b, 3) for a, b in
                                          zip(per.get("punica", []), per.get("round_robin", []))
                                          if b]}
    out = {"benchmark": "cluster_sim", "step_model": sm, "workload": {
        "arrivals": "Poisson", "prompt_tokens": "log-normal, median 128, sigma 0.8, in [8, 1024]",
        "output_tokens": "log-normal, median 192, sigma 0.8, in [8, 1024]",
        "mixes": "distinct: one adapter per request; uniform: sqrt(n) adapters equally popular;"
                 " skewed: Zipf(1.5) over sqrt(n) adapters; identical: one adapter",
        "load": "rate = load x GPUs x max_batch / (mean output tokens x full-batch step time)"},
        "params": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "results": results, "summary": summary}
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(out, Path(args.out).with_suffix(".png"))
    print(f"-> {args.out}")


def plot(out: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    res = out["results"]
    mixes = list(dict.fromkeys(r["mix"] for r in res))
    gpus = sorted({r["gpus"] for r in res})
    n = max(gpus)
    loads = sorted({r["load"] for r in res})
    mid = loads[len(loads) // 2]
    fig, axes = plt.subplots(3, len(mixes), figsize=(4.2 * len(mixes), 10), squeeze=False)
    colors = {"punica": "C3", "round_robin": "C0", "least_loaded": "C2"}
    styles = {"punica": "o-", "round_robin": "s--", "least_loaded": "^:"}
    for j, mix in enumerate(mixes):
        rows = [r for r in res if r["mix"] == mix and r["gpus"] == n]
        ax = axes[0][j]
        for r in rows:
            if r["load"] == mid:
                t, k = zip(*r["gpus_in_use_series"])
                ax.step(t, k, where="post", color=colors.get(r["policy"]), label=r["policy"],
                        ls="--" if r["policy"] == "round_robin" else "-")
        ax.set_title(f"{mix}: GPUs in use over time\n({n} GPUs, load {mid})")
        ax.set_xlabel("time (s)")
        ax.set_ylim(0, n + 1)
        ax = axes[1][j]
        for p in colors:
            pr = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["load"])
            if pr:
                ax.plot([r["throughput_tok_s"] for r in pr], [r["gpus_in_use_mean"] for r in pr],
                        styles[p], color=colors[p], label=p)
        ax.set_xlabel("throughput (tokens/s)")
        ax.set_ylabel("GPUs in use (mean)")
        ax = axes[2][j]
        for p in colors:
            pr = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["load"])
            if pr:
                ax.plot([r["gpus_in_use_mean"] for r in pr],
                        [r["latency_per_token_ms_p99"] for r in pr], styles[p], color=colors[p],
                        label=p)
        if rows:
            ax.axhline(rows[0]["latency_target_ms"], ls="--", color="gray", lw=1,
                       label="latency target")
        ax.set_xlabel("GPUs in use (mean)")
        ax.set_ylabel("p99 latency per token (ms)")
    axes[0][0].legend()
    axes[2][0].legend(fontsize=8)
    fig.suptitle("Punica's consolidation vs round-robin vs least-loaded (simulated, step model "
                 f"from {out['step_model']['model']} on {out['step_model']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
