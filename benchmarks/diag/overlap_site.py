"""Diagnostic: one projection site (base GEMM + its fused LoRA) in isolation, Llama-2-7B shapes.

    python benchmarks/diag/overlap_site.py --out /tmp/overlap_site.json

Answers "why does the LoRA beside the base GEMM (lora_overlap) hide so little of it": each
variant is one CUDA graph of --layers layers of a site, replayed; per-site microseconds:
  base      the cuBLAS projection alone (x @ W.T, weights rotated over the layers)
  lora      the fused LoRA launch alone (accumulate into y)
  serial    base, then the LoRA launch on the same stream (lora_overlap off)
  overlap   the LoRA delta on a high-priority side stream beside base, joined after it
for 32 one-row segments (the decode graphs' layout) of one adapter (identical) or 32
(distinct). A profiled replay records every kernel's grid, block, registers and shared
memory: whether the LoRA CTAs can share an SM with the GEMM's is what decides the overlap.
--cluster forces the fused kernel's CTAs per (segment, projection) in the overlapped variants
(the engine's choice is punica_core/model/lora.py's overlap_cluster); --carveouts repeats the
GEMM variants with cuBLASLt told to leave that many SMs free; --stream-ctas adds the streamed
kernel (lora_stream.cu) on that many CTAs, alone (lora_s<N>) and overlapped (overlap_s<N>).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from punica_core.engine.cuda_graphs import capture_graph  # noqa: E402
from punica_core.model.config import NAMED_SHAPES  # noqa: E402
from punica_core.model.lora import leave_sms_free  # noqa: E402
from punica_core.ops import cuda_backend  # noqa: E402


def site_shapes(cfg) -> dict[str, tuple[int, list[int]]]:
    H, I = cfg.hidden_size, cfg.intermediate_size
    return {"qkv": (H, [cfg.q_size, cfg.kv_size, cfg.kv_size]), "o": (H, [H]),
            "gate_up": (H, [I, I]), "down": (I, [H])}


def graph_of(fn):
    return capture_graph(fn, warmup=2)[0]


def time_graph(g, reps: int) -> float:
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * reps)]
    out = []
    for i in range(reps):
        ev[2 * i].record()
        g.replay()
        ev[2 * i + 1].record()
    torch.cuda.synchronize()
    for i in range(reps):
        out.append(ev[2 * i].elapsed_time(ev[2 * i + 1]) * 1e3)
    return statistics.median(out)


def kernel_attrs(g) -> list[dict]:
    """One profiled replay: each distinct kernel's launch shape and mean duration."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    by = {}
    for ev in events:
        if ev.get("cat") != "kernel":
            continue
        a = ev.get("args", {})
        name = ev["name"].replace("void ", "")[:70]
        k = by.setdefault(name, {"name": name, "calls": 0, "us": 0.0,
                                 "grid": a.get("grid"), "block": a.get("block"),
                                 "regs": a.get("registers per thread"),
                                 "smem": a.get("shared memory"),
                                 "blocks_per_sm": a.get("blocks per SM"),
                                 "occupancy_pct": a.get("est. achieved occupancy %")})
        k["calls"] += 1
        k["us"] += ev.get("dur", 0.0)
    return sorted(by.values(), key=lambda k: -k["us"])


def run_site(name, fin, outs, mix, layers, reps, dtype, carveouts, cluster, stream_ctas=(),
             stream_path=0):
    torch.manual_seed(0)
    dev = "cuda"
    T, slots, r = 32, 32, 16
    N = sum(outs)
    x = torch.randn(T, fin, device=dev, dtype=dtype)
    W = [torch.randn(N, fin, device=dev, dtype=dtype) * 0.01 for _ in range(layers)]
    y = torch.empty(T, N, device=dev, dtype=dtype)
    d = torch.empty(T, N, device=dev, dtype=dtype)
    v = torch.empty(T, r, device=dev, dtype=dtype)
    projs, off = [], 0
    ranks = torch.full((slots,), r, dtype=torch.int32, device=dev)
    for o in outs:
        a = torch.randn(slots, layers, r, fin, device=dev, dtype=dtype) * 0.01
        b = torch.randn(slots, layers, r, o, device=dev, dtype=dtype) * 0.01
        projs.append((a, b, ranks, off))
        off += o
    indptr = torch.arange(T + 1, dtype=torch.int32, device=dev)
    sl = torch.zeros(T, dtype=torch.int32, device=dev) if mix == "identical" else \
        torch.arange(T, dtype=torch.int32, device=dev)
    side = torch.cuda.Stream(priority=-1)

    def base():
        for l in range(layers):
            torch.matmul(x, W[l].t(), out=y)

    def lora(ctas=0):
        for l in range(layers):
            cuda_backend.add_lora(y, x, v, projs, indptr, sl, l, ctas=ctas,
                                  path=stream_path if ctas else 0)

    def serial():
        for l in range(layers):
            torch.matmul(x, W[l].t(), out=y)
            cuda_backend.add_lora(y, x, v, projs, indptr, sl, l)

    def overlap(gemm_first=False, ctas=0):
        cur = torch.cuda.current_stream()
        for l in range(layers):
            if gemm_first:      # the GEMM's node is created first; the LoRA waits on x only
                ready = torch.cuda.Event()
                ready.record(cur)
                torch.matmul(x, W[l].t(), out=y)
                side.wait_event(ready)
            else:
                side.wait_stream(cur)
            with torch.cuda.stream(side):
                cuda_backend.add_lora(d, x, v, projs, indptr, sl, l, accumulate=False,
                                      cluster=cluster, ctas=ctas,
                                      path=stream_path if ctas else 0)
            if not gemm_first:
                torch.matmul(x, W[l].t(), out=y)
            cur.wait_stream(side)

    res = {"site": name, "mix": mix, "in": fin, "outs": outs,
           "adapter_bytes_per_site": (1 if mix == "identical" else T) * r * (fin * len(outs) + N) * 2,
           "base_bytes_per_site": N * fin * 2}
    graphs = {"lora": graph_of(lora)}
    for n in stream_ctas:
        graphs[f"lora_s{n}"] = graph_of(functools.partial(lora, n))
    for c in carveouts:
        # cuBLASLt picks its kernel for (SMs - c) SMs, leaving c for the LoRA launch (the
        # engine's own switch, as base_projection uses it for o and down)
        tag = "" if c is None else f"_c{c}"
        with contextlib.nullcontext() if c is None else leave_sms_free(c):
            graphs["base" + tag] = graph_of(base)
            graphs["serial" + tag] = graph_of(serial)
            graphs["overlap" + tag] = graph_of(overlap)
            graphs["overlap_gemm_first" + tag] = graph_of(functools.partial(overlap, True))
            for n in stream_ctas:
                graphs[f"overlap_s{n}" + tag] = graph_of(functools.partial(overlap, False, n))
    for k, g in graphs.items():
        res[f"{k}_us"] = time_graph(g, reps) / layers
    for k in [k for k in res if k.startswith(("serial", "overlap")) and k.endswith("_us")]:
        m = re.search(r"_c\d+_us$", k)
        tag = m.group(0)[:-3] if m else ""
        res[k[:-3] + "_added_us"] = res[k] - res["base" + tag + "_us"]
    res["kernels"] = {k: kernel_attrs(g) for k, g in graphs.items()
                      if k.startswith("overlap") and "gemm_first" not in k and "_s" not in k}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sites", default="qkv,o,gate_up,down")
    ap.add_argument("--carveouts", default="none,16,32",
                    help="SM carve-outs for cuBLASLt (none: torch's default heuristics)")
    ap.add_argument("--cluster", type=int, default=0, help="fused kernel cluster; 0: its own")
    ap.add_argument("--stream-ctas", default="",
                    help="comma list of CTA counts for the streamed kernel's variants")
    ap.add_argument("--stream-path", type=int, default=0, choices=(0, 4, 5),
                    help="streamed variants: 0 the op's default copies, 4 bulk (TMA), 5 cp.async")
    ap.add_argument("--out", default="/tmp/overlap_site.json")
    args = ap.parse_args()
    assert cuda_backend.available(), "needs the CUDA kernels"
    cfg = NAMED_SHAPES[args.model]
    carveouts = [None if c == "none" else int(c) for c in args.carveouts.split(",")]
    shapes = site_shapes(cfg)
    stream_ctas = [int(n) for n in args.stream_ctas.split(",") if n]
    rows = []
    for s in args.sites.split(","):
        fin, outs = shapes[s]
        for mix in ("identical", "distinct"):
            r = run_site(s, fin, outs, mix, args.layers, args.reps, torch.bfloat16, carveouts,
                         args.cluster, stream_ctas, args.stream_path)
            rows.append(r)
            print(f"{s:8s} {mix:9s} lora {r['lora_us']:5.1f}  (bytes at 4.1 TB/s "
                  f"{r['adapter_bytes_per_site'] / 4.1e6:.1f} us)")
            for c in carveouts:
                tag = "" if c is None else f"_c{c}"
                print(f"     carveout {str(c):4s}: base {r['base' + tag + '_us']:5.1f}  serial +"
                      f"{r['serial' + tag + '_added_us']:5.1f}  overlap +"
                      f"{r['overlap' + tag + '_added_us']:5.1f}  gemm first +"
                      f"{r['overlap_gemm_first' + tag + '_added_us']:5.1f} us" +
                      "".join(f"  s{n} +{r[f'overlap_s{n}' + tag + '_added_us']:5.1f}"
                              for n in stream_ctas))
            if stream_ctas:
                print("     streamed alone:", "  ".join(f"s{n} {r[f'lora_s{n}_us']:5.1f}"
                                                        for n in stream_ctas))
            torch.cuda.empty_cache()
    for r in rows:
        for variant, ks in r["kernels"].items():
            print("  ", r["site"], r["mix"], variant, [(k["name"][:28], k["grid"], k["regs"],
                                                         k["smem"]) for k in ks])
    Path(args.out).write_text(json.dumps(
        {"model": args.model, "device": torch.cuda.get_device_name(),
         "cluster": args.cluster, "stream_ctas": stream_ctas, "stream_path": args.stream_path,
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
