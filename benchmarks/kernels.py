"""SGMV kernels against torch baselines on one GPU; writes JSON and a plot.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.json [--quick]

Measured in one run:
  * the device's copy bandwidth (a 2 GiB device-to-device copy, bytes read + written) and the
    dense torch.matmul rate of every prefill shape: the two ceilings;
  * decode: Llama-2-7B / 13B projection shapes (q/k/v/o: hidden->hidden, gate/up: hidden->inter,
    down: inter->hidden), rows 1..64, distinct adapters 1..64, rank 16 and 64; time of
    punica::add_lora ("ours": shrink + expand, one fused launch for decode batches on sm_90) and
    of the two-kernel pair sgmv_shrink + sgmv_expand ("pair"), GB/s on the adapter bytes read (only each adapter's real rank rows) and its fraction
    of the copy bandwidth; against (a) the torch reference gather + bmm
    (torch_ref.gather_bmm_*, gathering the batch's largest rank), (b) a Python loop of
    torch.matmul per adapter (torch_ref.sgmv_*), (c) the same work padded to one rank as one
    batched torch.bmm (weights pre-stacked per batch, not timed);
  * a decode batch mixing ranks 4, 8, 16, 64, 128 with no-adapter rows, against itself padded
    to rank 128 (our kernels and the padded bmm);
  * the engine's launches per layer (q/k/v and gate/up as one add_lora call each, o, down):
    32 rows, 32 distinct rank-16 adapters, with and without x_ready, and their sum per layer;
  * prefill: segments of 128..2048 rows (4096 rows in all), rank 16 and 64: TFLOP/s of shrink and
    expand against a dense torch.matmul of the same total shape (and torch.addmm_ for expand,
    which also reads y).
Every time is the median over repeats of CUDA-graph replays, each replay cycling through enough
distinct (slot, layer) weights that they cannot stay in L2. Eager (no graph) times are also given
for the headline decode case.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from punica_core.engine.cuda_graphs import capture_graph  # noqa: E402
from punica_core.ops import cuda_backend, torch_ref  # noqa: E402

DT = torch.bfloat16
MODELS = {"llama-2-7b": (4096, 11008), "llama-2-13b": (5120, 13824)}
POOL_SLOTS = 64
POOL_LAYERS = 16
ROTATE_BYTES = 256 << 20          # weight bytes one graph replay cycles through (> 5x L2)


def shapes_of(model):
    h, i = MODELS[model]
    return {"qkvo": (h, h), "gate_up": (h, i), "down": (i, h)}


# --------------------------------------------------------------------------------------------
# timing
def time_graph(body, calls, target_ms=25.0, repeats=5):
    """Median time of one call of `body` (which makes `calls` calls), from CUDA-graph replays."""
    graph, _ = capture_graph(body)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6) * 1e3
    reps = max(1, min(200, int(target_ms / once)))
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / reps / calls)
    del graph
    return statistics.median(times) * 1e-3, (max(times) - min(times)) * 1e-3  # seconds


def time_eager(body, calls, repeats=5):
    body()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        body()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / calls)
    return statistics.median(times) * 1e-3


def copy_bandwidth():
    src = torch.randn(1 << 30, device="cuda", dtype=DT)      # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    t = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 30) * 2 / t


# --------------------------------------------------------------------------------------------
# decode
class Pool:
    """Stacked adapter weights of one projection shape: [slots, layers, max_rank, features]."""

    def __init__(self, fin, fout, max_rank, ranks):
        self.a = torch.randn(POOL_SLOTS, POOL_LAYERS, max_rank, fin, device="cuda", dtype=DT)
        self.b = torch.randn(POOL_SLOTS, POOL_LAYERS, max_rank, fout, device="cuda", dtype=DT)
        self.a.mul_(fin ** -0.5)
        self.b.mul_(0.05)
        self.ranks_list = list(ranks)
        self.ranks = torch.tensor(ranks, dtype=torch.int32, device="cuda")
        self.fin, self.fout = fin, fout


def decode_batch(rows, adapters, ranks_of_adapter, no_adapter_rows=0):
    """Segments: `adapters` contiguous groups (sizes as even as possible) + no-adapter rows."""
    sizes = [rows // adapters + (1 if i < rows % adapters else 0) for i in range(adapters)]
    sizes += [1] * no_adapter_rows
    return sizes


def bench_decode_case(pool, fin, fout, rows, adapters, seg_ranks, no_adapter_rows=0,
                      baselines=True, eager=False, pad_rank=None, sweep=False):
    """seg_ranks: the rank of each adapter in the batch (slot ranks are set per call)."""
    g = torch.Generator().manual_seed(rows * 131 + adapters)
    sizes = decode_batch(rows, adapters, seg_ranks, no_adapter_rows)
    n = sum(sizes)
    indptr = [0]
    for s in sizes:
        indptr.append(indptr[-1] + s)
    real_bytes = sum(seg_ranks) * (fin + fout) * 2
    calls = max(8, min(256, math.ceil(ROTATE_BYTES / max(real_bytes, 1))))
    perm = torch.randperm(POOL_SLOTS, generator=g).tolist()
    call_slots, call_layers = [], []
    for c in range(calls):
        base = (c // POOL_LAYERS) * adapters
        call_slots.append([perm[(base + i) % POOL_SLOTS] for i in range(adapters)] +
                          [-1] * no_adapter_rows)
        call_layers.append(c % POOL_LAYERS)
    # every slot gets the rank of the batch position it is used at (same for all calls, since
    # a slot keeps its position modulo `adapters`... not always: give each slot one rank)
    slot_rank = [0] * POOL_SLOTS
    for c in range(calls):
        for i in range(adapters):
            slot_rank[call_slots[c][i]] = seg_ranks[i % len(seg_ranks)]
    # recompute the real bytes per call from the slot ranks actually used
    per_call = [sum(slot_rank[s] for s in call_slots[c][:adapters]) * (fin + fout) * 2
                for c in range(calls)]
    real_bytes = statistics.mean(per_call)
    ranks_t = torch.tensor(slot_rank, dtype=torch.int32, device="cuda")
    pool.ranks_list = slot_rank
    x = torch.randn(n, fin, device="cuda", dtype=DT)
    y = torch.zeros(n, fout, device="cuda", dtype=DT)
    max_rank = pool.a.shape[2]
    v = torch.zeros(n, max_rank, device="cuda", dtype=DT)
    indptr_t = torch.tensor(indptr, dtype=torch.int32, device="cuda")
    slots_t = [torch.tensor(s, dtype=torch.int32, device="cuda") for s in call_slots]
    a, b = pool.a, pool.b
    out = {"rows": rows, "adapters": adapters, "no_adapter_rows": no_adapter_rows,
           "ranks": sorted(set(seg_ranks)), "adapter_bytes": real_bytes, "calls_per_graph": calls}

    def pair(pdl=True):     # the two-kernel path: shrink into v, then expand from v
        def body():
            for c in range(calls):
                torch.ops.punica.sgmv_shrink(v, x, a, indptr_t, slots_t[c], ranks_t,
                                             call_layers[c], 0, pdl)
                torch.ops.punica.sgmv_expand(y, v, b, indptr_t, slots_t[c], ranks_t,
                                             call_layers[c], 0, 0, pdl)
        return body

    def ours(pdl=True, cluster=0, ctas=0, x_ready=False):   # add_lora: the fused kernel
        def body():
            for c in range(calls):
                torch.ops.punica.add_lora(y, x, v, [a], [b], [ranks_t], [0], indptr_t,
                                          slots_t[c], call_layers[c], 0, cluster, pdl,
                                          ctas=ctas, x_ready=x_ready)
        return body

    out["ours_s"], out["ours_spread_s"] = time_graph(ours(True), calls)
    # x is never written here, so the launches may say so: each then computes its delta while
    # the one before finishes and waits only for y (every call still accumulates into one y)
    out["ours_x_ready_s"], _ = time_graph(ours(True, x_ready=True), calls)
    out["ours_no_pdl_s"], _ = time_graph(ours(False), calls)
    out["pair_s"], _ = time_graph(pair(True), calls)
    out["pair_no_pdl_s"], _ = time_graph(pair(False), calls)
    # the streamed kernel (lora_stream.cu, one CTA per SM): add_lora with ctas > 0
    out["streamed_s"], _ = time_graph(ours(True, 0, torch.cuda.get_device_properties(0)
                                           .multi_processor_count), calls)
    if eager or sweep:   # which cluster size the auto choice should take
        out["ours_by_cluster_s"] = {c: time_graph(ours(True, c), calls)[0] for c in (4, 8, 16)}
        out["ours_x_ready_by_cluster_s"] = {c: time_graph(ours(True, c, x_ready=True), calls)[0]
                                            for c in (2, 4, 8, 16)}
    if eager:
        out["ours_eager_s"] = time_eager(ours(True), calls)
    if baselines:
        rmax = max(seg_ranks)
        row_slots = []
        for c in range(calls):
            rs = [s for s, k in zip(call_slots[c], sizes) for _ in range(k)]
            row_slots.append(torch.tensor(rs, dtype=torch.long, device="cuda"))
        a_r, b_r = a[:, :, :rmax], b[:, :, :rmax]
        adapter_rows = sum(sizes[:adapters])

        def ref_body():
            for c in range(calls):
                m = row_slots[c][:adapter_rows]
                vv = torch_ref.gather_bmm_shrink(x[:adapter_rows], a_r, m, call_layers[c])
                torch_ref.gather_bmm_expand(y[:adapter_rows], vv, b_r, m, call_layers[c])
        out["torch_ref_gather_bmm_s"], _ = time_graph(ref_body, calls)

        def loop_body():
            for c in range(calls):
                torch_ref.sgmv_shrink(v, x, a, indptr, call_slots[c], slot_rank, call_layers[c])
                torch_ref.sgmv_expand(y, v, b, indptr, call_slots[c], slot_rank, call_layers[c])
        out["torch_loop_matmul_s"], _ = time_graph(loop_body, calls)
        if eager:
            out["torch_loop_matmul_eager_s"] = time_eager(loop_body, calls)
            out["torch_ref_gather_bmm_eager_s"] = time_eager(ref_body, calls)

        # one batched bmm over the batch padded to one rank (and equal rows per adapter)
        rp = pad_rank or rmax
        mrows = max(sizes[:adapters])
        sel = [torch.tensor(call_slots[c][:adapters], device="cuda") for c in range(calls)]
        a_st = [a[sel[c], call_layers[c], :rp].contiguous() for c in range(calls)]  # [A, rp, in]
        b_st = [b[sel[c], call_layers[c], :rp].contiguous() for c in range(calls)]  # [A, rp, out]
        xg = torch.randn(adapters, mrows, fin, device="cuda", dtype=DT)
        yg = torch.zeros(adapters, mrows, fout, device="cuda", dtype=DT)

        def bmm_body():
            for c in range(calls):
                vg = torch.bmm(xg, a_st[c].transpose(1, 2))
                yg.baddbmm_(vg, b_st[c])
        out["torch_padded_bmm_s"], _ = time_graph(bmm_body, calls)
        out["padded_rank"] = rp
        del a_st, b_st
    return out


def run_decode(copy_bw, quick):
    results = []
    grid = [(1, 1), (8, 1), (8, 8), (32, 1), (32, 8), (32, 32), (64, 1), (64, 8), (64, 32),
            (64, 64)]
    if quick:
        grid = [(1, 1), (32, 32), (64, 64)]
    models = ["llama-2-7b"] if quick else list(MODELS)
    for model in models:
        for rank in (16, 64):
            for name, (fin, fout) in shapes_of(model).items():
                pool = Pool(fin, fout, rank, [rank] * POOL_SLOTS)   # a pool for this rank
                for rows, adapters in grid:
                    headline = model == "llama-2-7b" and rank == 16 and (rows, adapters) == (32, 32)
                    r = bench_decode_case(pool, fin, fout, rows, adapters, [rank] * adapters,
                                          eager=headline)
                    r.update(model=model, shape=name, fin=fin, fout=fout, rank=rank)
                    finish_decode(r, copy_bw)
                    results.append(r)
                    print(fmt_decode(r), flush=True)
                del pool
                torch.cuda.empty_cache()
    return results


def launch_floor():
    """Time of a shrink + expand pair with nothing to do (32 segments, all without an adapter):
    the fixed cost of two dependent launches in a graph, which no amount of bandwidth removes."""
    fin = fout = 4096
    pool = Pool(fin, fout, 16, [16] * POOL_SLOTS)
    n, calls = 32, 64
    x = torch.randn(n, fin, device="cuda", dtype=DT)
    y = torch.zeros(n, fout, device="cuda", dtype=DT)
    v = torch.zeros(n, 16, device="cuda", dtype=DT)
    indptr = torch.arange(n + 1, dtype=torch.int32, device="cuda")
    none = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    out = {}
    for pdl in (True, False):
        def body():
            for c in range(calls):
                torch.ops.punica.sgmv_shrink(v, x, pool.a, indptr, none, pool.ranks, 0, 0, pdl)
                torch.ops.punica.sgmv_expand(y, v, pool.b, indptr, none, pool.ranks, 0, 0, 0, pdl)
        out["pdl" if pdl else "no_pdl"], _ = time_graph(body, calls)

    def fused():
        for c in range(calls):
            torch.ops.punica.add_lora(y, x, v, [pool.a], [pool.b], [pool.ranks], [0], indptr, none,
                                      0)
    out["fused_pdl"], _ = time_graph(fused, calls)

    def torch_pair():   # two tiny torch kernels, for scale
        for c in range(calls):
            v.add_(1)
            y.add_(1)
    out["two_torch_elementwise"], _ = time_graph(torch_pair, calls)
    print("launch floor (empty shrink+expand pair): "
          + ", ".join(f"{k} {t * 1e6:.2f} us" for k, t in out.items()), flush=True)
    del pool
    torch.cuda.empty_cache()
    return out


def site_shapes(model):
    """The engine's LoRA launches per layer: one add_lora per projection site."""
    h, i = MODELS[model]
    return {"qkv": (h, [h, h, h]), "o": (h, [h]), "gate_up": (h, [i, i]), "down": (i, [h])}


def bench_site(fin, fouts, rows, rank):
    """One add_lora call per site as the engine makes it (q/k/v or gate/up in one launch, each
    projection its own pool), `rows` rows with as many distinct adapters, in a chain of calls
    on one y (weights rotated past L2 as above); with and without x_ready."""
    pools = [Pool(fin, fout, rank, [rank] * POOL_SLOTS) for fout in fouts]
    offs = [sum(fouts[:k]) for k in range(len(fouts))]
    real_bytes = rows * rank * sum(fin + fout for fout in fouts) * 2
    calls = max(8, min(256, math.ceil(ROTATE_BYTES / real_bytes)))
    g = torch.Generator().manual_seed(rows * 7 + len(fouts))
    perm = torch.randperm(POOL_SLOTS, generator=g).tolist()
    slots = [torch.tensor([perm[(c // POOL_LAYERS * rows + i) % POOL_SLOTS] for i in range(rows)],
                          dtype=torch.int32, device="cuda") for c in range(calls)]
    indptr = torch.arange(rows + 1, dtype=torch.int32, device="cuda")
    x = torch.randn(rows, fin, device="cuda", dtype=DT)
    y = torch.zeros(rows, sum(fouts), device="cuda", dtype=DT)
    v = torch.zeros(rows, rank, device="cuda", dtype=DT)
    a, b, ranks = [q.a for q in pools], [q.b for q in pools], [q.ranks for q in pools]

    def ours(x_ready):
        def body():
            for c in range(calls):
                torch.ops.punica.add_lora(y, x, v, a, b, ranks, offs, indptr, slots[c],
                                          c % POOL_LAYERS, 0, 0, True, x_ready=x_ready)
        return body
    out = {"rows": rows, "adapters": rows, "rank": rank, "fin": fin, "fouts": fouts,
           "adapter_bytes": real_bytes, "calls_per_graph": calls}
    out["ours_s"], _ = time_graph(ours(False), calls)
    out["ours_x_ready_s"], _ = time_graph(ours(True), calls)
    del pools
    torch.cuda.empty_cache()
    return out


def run_sites(copy_bw):
    """Llama-2-7B / 13B, 32 rows with 32 distinct rank-16 adapters, per site and per layer."""
    results = []
    for model in MODELS:
        layer_t, layer_xr, layer_bytes = 0.0, 0.0, 0
        for site, (fin, fouts) in site_shapes(model).items():
            r = bench_site(fin, fouts, 32, 16)
            r.update(model=model, site=site)
            r["ours_frac_copy_bw"] = r["adapter_bytes"] / r["ours_s"] / copy_bw
            r["ours_x_ready_frac_copy_bw"] = r["adapter_bytes"] / r["ours_x_ready_s"] / copy_bw
            layer_t += r["ours_s"]
            layer_xr += r["ours_x_ready_s"]
            layer_bytes += r["adapter_bytes"]
            results.append(r)
            print(f"site {model[8:]:>4} {site:>7}: {r['ours_s'] * 1e6:6.1f} us "
                  f"({100 * r['ours_frac_copy_bw']:3.0f}%), x_ready {r['ours_x_ready_s'] * 1e6:6.1f}"
                  f" us ({100 * r['ours_x_ready_frac_copy_bw']:3.0f}%)", flush=True)
        results.append({"model": model, "site": "layer", "adapter_bytes": layer_bytes,
                        "ours_s": layer_t, "ours_x_ready_s": layer_xr,
                        "ours_frac_copy_bw": layer_bytes / layer_t / copy_bw,
                        "ours_x_ready_frac_copy_bw": layer_bytes / layer_xr / copy_bw})
        print(f"site {model[8:]:>4}   layer: {100 * layer_bytes / layer_t / copy_bw:3.0f}%, x_ready "
              f"{100 * layer_bytes / layer_xr / copy_bw:3.0f}%", flush=True)
    return results


def run_mixed(copy_bw):
    """Ranks 4, 8, 16, 64, 128 (6 adapters each) + 2 rows without an adapter; 32 rows."""
    results = []
    mix = [4, 8, 16, 64, 128] * 6
    for name, (fin, fout) in shapes_of("llama-2-7b").items():
        pool = Pool(fin, fout, 128, [128] * POOL_SLOTS)
        r = bench_decode_case(pool, fin, fout, 30, 30, mix, no_adapter_rows=2, pad_rank=128,
                              sweep=True)
        r.update(model="llama-2-7b", shape=name, fin=fin, fout=fout, rank="mixed")
        finish_decode(r, copy_bw)
        padded = bench_decode_case(pool, fin, fout, 30, 30, [128] * 30, no_adapter_rows=2,
                                   baselines=False)
        r["ours_padded_to_128_s"] = padded["ours_s"]
        r["padded_to_128_bytes"] = padded["adapter_bytes"]
        r["ours_vs_padded_128_speedup"] = padded["ours_s"] / r["ours_s"]
        results.append(r)
        print(fmt_decode(r), f"| padded-128 ours {padded['ours_s'] * 1e6:.1f} us", flush=True)
        del pool
        torch.cuda.empty_cache()
    return results


def finish_decode(r, copy_bw):
    r["ours_gbps"] = r["adapter_bytes"] / r["ours_s"] / 1e9
    r["ours_frac_copy_bw"] = r["adapter_bytes"] / r["ours_s"] / copy_bw
    r["ours_no_pdl_frac_copy_bw"] = r["adapter_bytes"] / r["ours_no_pdl_s"] / copy_bw
    r["ours_x_ready_frac_copy_bw"] = r["adapter_bytes"] / r["ours_x_ready_s"] / copy_bw
    r["pair_frac_copy_bw"] = r["adapter_bytes"] / r["pair_s"] / copy_bw
    r["streamed_frac_copy_bw"] = r["adapter_bytes"] / r["streamed_s"] / copy_bw
    r["fused_vs_pair_speedup"] = r["pair_s"] / r["ours_s"]
    for k in ("torch_ref_gather_bmm", "torch_loop_matmul", "torch_padded_bmm"):
        if k + "_s" in r:
            r[k + "_speedup"] = r[k + "_s"] / r["ours_s"]


def fmt_decode(r):
    s = (f"{r.get('model', '')[8:]:>4} {r.get('shape', ''):>7} r={str(r.get('rank')):>5} "
         f"rows={r['rows']:>2} A={r['adapters']:>2}  ours {r['ours_s'] * 1e6:7.1f} us "
         f"{r['ours_gbps']:6.0f} GB/s ({100 * r['ours_frac_copy_bw']:3.0f}%, x_ready "
         f"{100 * r['ours_x_ready_frac_copy_bw']:3.0f}%, no-PDL "
         f"{100 * r['ours_no_pdl_frac_copy_bw']:3.0f}%; pair {100 * r['pair_frac_copy_bw']:3.0f}%;"
         f" streamed {100 * r['streamed_frac_copy_bw']:3.0f}%)")
    if "torch_ref_gather_bmm_speedup" in r:
        s += (f"  x{r['torch_ref_gather_bmm_speedup']:.1f} ref  x{r['torch_loop_matmul_speedup']:.1f}"
              f" loop  x{r['torch_padded_bmm_speedup']:.1f} bmm")
    return s


# --------------------------------------------------------------------------------------------
# prefill
def run_prefill(quick):
    results = []
    total = 4096
    seg_lens = [128, 512, 2048] if quick else [128, 256, 512, 1024, 2048]
    nbuf = 4
    for rank in (16, 64):
        for name, (fin, fout) in shapes_of("llama-2-7b").items():
            pool = Pool(fin, fout, 64, [rank] * POOL_SLOTS)
            xs = [torch.randn(total, fin, device="cuda", dtype=DT) for _ in range(nbuf)]
            ys = [torch.randn(total, fout, device="cuda", dtype=DT) for _ in range(nbuf)]
            vs = [torch.randn(total, 64, device="cuda", dtype=DT) for _ in range(nbuf)]
            ranks_t = torch.tensor([rank] * POOL_SLOTS, dtype=torch.int32, device="cuda")
            calls = 8
            # dense references: one adapter's weights for all rows
            wa = [pool.a[c, c % POOL_LAYERS, :rank].t() for c in range(calls)]   # [in, r]
            wb = [pool.b[c, c % POOL_LAYERS, :rank] for c in range(calls)]       # [r, out]

            def dense_shrink():
                for c in range(calls):
                    torch.matmul(xs[c % nbuf], wa[c])

            def dense_expand():
                for c in range(calls):
                    torch.matmul(vs[c % nbuf][:, :rank], wb[c])

            def dense_addmm():
                for c in range(calls):
                    ys[c % nbuf].addmm_(vs[c % nbuf][:, :rank], wb[c])

            t_ds, _ = time_graph(dense_shrink, calls)
            t_de, _ = time_graph(dense_expand, calls)
            t_da, _ = time_graph(dense_addmm, calls)
            for L in seg_lens:
                nseg = total // L
                indptr = torch.arange(0, total + 1, L, dtype=torch.int32, device="cuda")
                slots = [torch.tensor([(c * nseg + i) % POOL_SLOTS for i in range(nseg)],
                                      dtype=torch.int32, device="cuda") for c in range(calls)]
                slot_lists = [s.tolist() for s in slots]
                ind_list = indptr.tolist()

                def shrink():
                    for c in range(calls):
                        torch.ops.punica.sgmv_shrink(vs[c % nbuf], xs[c % nbuf], pool.a, indptr,
                                                     slots[c], ranks_t, c % POOL_LAYERS)

                def expand():
                    for c in range(calls):
                        torch.ops.punica.sgmv_expand(ys[c % nbuf], vs[c % nbuf], pool.b, indptr,
                                                     slots[c], ranks_t, c % POOL_LAYERS, 0)

                def loop():
                    for c in range(calls):
                        torch_ref.sgmv_shrink(vs[c % nbuf], xs[c % nbuf], pool.a, ind_list,
                                              slot_lists[c], [rank] * POOL_SLOTS, c % POOL_LAYERS)
                        torch_ref.sgmv_expand(ys[c % nbuf], vs[c % nbuf], pool.b, ind_list,
                                              slot_lists[c], [rank] * POOL_SLOTS, c % POOL_LAYERS)

                t_s, _ = time_graph(shrink, calls)
                t_e, _ = time_graph(expand, calls)
                t_l, _ = time_graph(loop, calls)
                fl_s, fl_e = 2 * total * rank * fin, 2 * total * rank * fout
                r = dict(model="llama-2-7b", shape=name, fin=fin, fout=fout, rank=rank,
                         seg_len=L, segments=nseg, rows=total,
                         shrink_s=t_s, expand_s=t_e, torch_loop_matmul_s=t_l,
                         dense_shrink_s=t_ds, dense_expand_s=t_de, dense_addmm_s=t_da,
                         shrink_tflops=fl_s / t_s / 1e12, expand_tflops=fl_e / t_e / 1e12,
                         dense_shrink_tflops=fl_s / t_ds / 1e12,
                         dense_expand_tflops=fl_e / t_de / 1e12,
                         dense_addmm_tflops=fl_e / t_da / 1e12)
                r["shrink_frac_dense"] = r["shrink_tflops"] / r["dense_shrink_tflops"]
                r["expand_frac_dense"] = r["expand_tflops"] / r["dense_expand_tflops"]
                r["expand_frac_addmm"] = r["expand_tflops"] / r["dense_addmm_tflops"]
                r["pair_frac_dense"] = (t_ds + t_de) / (t_s + t_e)
                r["loop_speedup"] = t_l / (t_s + t_e)
                results.append(r)
                print(f"prefill {name:>7} r={rank:>2} seg={L:>4}x{nseg:<2} shrink "
                      f"{r['shrink_tflops']:6.1f} TF/s ({100 * r['shrink_frac_dense']:3.0f}% of "
                      f"dense {r['dense_shrink_tflops']:.1f})  expand {r['expand_tflops']:6.1f} "
                      f"TF/s ({100 * r['expand_frac_dense']:3.0f}% of matmul "
                      f"{r['dense_expand_tflops']:.1f}, {100 * r['expand_frac_addmm']:3.0f}% of "
                      f"addmm)  x{r['loop_speedup']:.1f} vs loop", flush=True)
            del pool, xs, ys, vs
            torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------------
def acceptance(res, copy_bw):
    acc = {}
    head = [r for r in res["decode"] if r["model"] == "llama-2-7b" and r["rank"] == 16
            and r["rows"] == 32 and r["adapters"] == 32]
    if head:
        layer = {"qkvo": 4, "gate_up": 2, "down": 1}
        t = sum(layer[r["shape"]] * r["ours_s"] for r in head)
        by = sum(layer[r["shape"]] * r["adapter_bytes"] for r in head)
        t_ref = sum(layer[r["shape"]] * r["torch_ref_gather_bmm_s"] for r in head)
        t_bmm = sum(layer[r["shape"]] * r["torch_padded_bmm_s"] for r in head)
        t_xr = sum(layer[r["shape"]] * r["ours_x_ready_s"] for r in head)

        def passes(frac, time_key):
            return all(r[frac] >= 0.7 and r["torch_ref_gather_bmm_s"] / r[time_key] >= 5
                       and r["torch_padded_bmm_s"] / r[time_key] >= 2 for r in head)
        acc["decode_7b_32x32_r16"] = {
            "per_shape": {r["shape"]: {"frac_copy_bw": r["ours_frac_copy_bw"],
                                       "frac_copy_bw_x_ready": r["ours_x_ready_frac_copy_bw"],
                                       "speedup_vs_torch_ref": r["torch_ref_gather_bmm_speedup"],
                                       "speedup_vs_padded_bmm": r["torch_padded_bmm_speedup"]}
                          for r in head},
            "whole_layer_frac_copy_bw": by / t / copy_bw,
            "whole_layer_frac_copy_bw_x_ready": by / t_xr / copy_bw,
            "whole_layer_speedup_vs_torch_ref": t_ref / t,
            "whole_layer_speedup_vs_padded_bmm": t_bmm / t,
            "pass": passes("ours_frac_copy_bw", "ours_s"),
            # launches that are told x is ready (x_ready: x not written by a kernel they overlap)
            "pass_x_ready": passes("ours_x_ready_frac_copy_bw", "ours_x_ready_s"),
        }
    pre = [r for r in res["prefill"] if r["seg_len"] >= 512]
    if pre:
        acc["prefill_seg_ge_512"] = {
            "min_shrink_frac_dense": min(r["shrink_frac_dense"] for r in pre),
            "min_expand_frac_dense_matmul": min(r["expand_frac_dense"] for r in pre),
            "min_expand_frac_addmm": min(r["expand_frac_addmm"] for r in pre),
            "min_pair_frac_dense": min(r["pair_frac_dense"] for r in pre),
            "pass": all(r["shrink_frac_dense"] >= 0.5 and r["expand_frac_dense"] >= 0.5
                        for r in pre),
        }
    if res["mixed"]:
        acc["mixed_ranks_decode"] = {
            "per_shape": {r["shape"]: {"frac_copy_bw_real_bytes": r["ours_frac_copy_bw"],
                                       "speedup_vs_ours_padded_128": r["ours_vs_padded_128_speedup"],
                                       "speedup_vs_padded_bmm_128": r["torch_padded_bmm_speedup"]}
                          for r in res["mixed"]},
            "pass": all(r["ours_frac_copy_bw"] >= 0.7 and r["ours_vs_padded_128_speedup"] > 1.5
                        for r in res["mixed"]),
        }
    return acc


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    ax = axes[0]
    rows = [r for r in res["decode"] if r["model"] == "llama-2-7b" and r["rank"] == 16]
    labels = sorted({(r["rows"], r["adapters"]) for r in rows})
    width = 0.8 / 3
    for k, shape in enumerate(("qkvo", "gate_up", "down")):
        sel = {(r["rows"], r["adapters"]): r for r in rows if r["shape"] == shape}
        xs = [i + (k - 1) * width for i in range(len(labels))]
        bars = ax.bar(xs, [sel[lab]["ours_frac_copy_bw"] * 100 for lab in labels], width,
                      label=shape)
        # x_ready (the same chain told that x is ready): the outline above each bar
        ax.bar(xs, [sel[lab].get("ours_x_ready_frac_copy_bw", 0) * 100 for lab in labels], width,
               fill=False, edgecolor=bars[0].get_facecolor(), lw=1,
               label="outline: x_ready" if k == 0 else None)
    ax.axhline(70, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{r}r/{a}A" for r, a in labels], rotation=45)
    ax.set_ylabel("% of measured copy bandwidth (adapter bytes)")
    ax.set_title(f"Decode, Llama-2-7B, rank 16: shrink+expand ({res['device']})")
    ax.legend()
    ax = axes[1]
    pre = [r for r in res["prefill"] if r["rank"] == 64]
    for shape, mk in (("qkvo", "o"), ("gate_up", "s"), ("down", "^")):
        sel = [r for r in pre if r["shape"] == shape]
        ax.plot([r["seg_len"] for r in sel], [r["shrink_tflops"] for r in sel], "-" + mk,
                label=f"shrink {shape}")
        ax.plot([r["seg_len"] for r in sel], [r["expand_tflops"] for r in sel], "--" + mk,
                label=f"expand {shape}")
        ax.axhline(sel[0]["dense_shrink_tflops"], color="gray", lw=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per segment (4096 rows in all)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("Prefill, rank 64 (gray: dense matmul, shrink shapes)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def punica_env():
    """The PUNICA_* settings of this run (kernel knobs change what is measured)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("PUNICA_")}


def save(res, out: Path):
    """The JSON, and its plot beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    try:
        plot(res, out.with_suffix(".png"))
    except Exception as e:  # the numbers matter more than the picture
        print("plot failed:", e)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels_h100.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prefill-only", action="store_true",
                    help="re-run only the prefill cases into the existing --out file (its decode "
                         "and mixed results kept, the acceptance recomputed, the re-run recorded "
                         "under prefill_rerun): for a change to the prefill kernels alone")
    args = ap.parse_args()
    assert torch.cuda.is_available() and cuda_backend.available(), "needs the CUDA kernels"
    torch.manual_seed(0)
    if args.prefill_only:
        out = Path(args.out)
        res = json.loads(out.read_text())
        t0 = time.time()
        res["prefill"] = run_prefill(res.get("quick", False))
        res["acceptance"] = acceptance(res, res["copy_bandwidth_Bps"])
        res["prefill_rerun"] = {"device": torch.cuda.get_device_properties(0).name, "env": punica_env(),
                                "torch": torch.__version__, "wall_s": time.time() - t0,
                                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        save(res, out)
        print(json.dumps(res["acceptance"]["prefill_seg_ge_512"], indent=1))
        return
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"{props.name}: {props.multi_processor_count} SMs, copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    res = {"device": props.name, "sms": props.multi_processor_count,
           "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(DT),
           "kernels_source": cuda_backend.source, "copy_bandwidth_Bps": copy_bw,
           "method": "median of CUDA-graph replays; weights rotated over >= 256 MB per replay",
           "quick": args.quick, "env": punica_env()}
    t0 = time.time()
    res["empty_pair_s"] = launch_floor()
    res["decode"] = run_decode(copy_bw, args.quick)
    res["sites"] = run_sites(copy_bw)
    res["mixed"] = run_mixed(copy_bw)
    res["prefill"] = run_prefill(args.quick)
    res["acceptance"] = acceptance(res, copy_bw)
    res["wall_s"] = time.time() - t0
    save(res, Path(args.out))
    print(json.dumps(res["acceptance"], indent=1))


if __name__ == "__main__":
    main()
