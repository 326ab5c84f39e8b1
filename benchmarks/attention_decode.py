"""Paged decode attention: our Triton kernel against the torch reference on one GPU; JSON out.

    python benchmarks/attention_decode.py --out benchmarks/results/attention_decode_h200.json [--quick]

Measured:
  * the device's copy bandwidth (2 GiB device-to-device copy, bytes read + written): the ceiling;
  * Llama-2-7B (32 heads), 13B (40 heads), head_dim 128, and SmolLM2-135M (9 heads, 3 KV heads,
    head_dim 64); B 1 / 8 / 32; every request at context 256..4096; block size 16; blocks
    shuffled through a pool. Time of ours (auto split-K, and single pass) and of the reference
    (the decode branch of paged_attention_ref: gather + masked SDPA; the gather index is built
    once per step in the engine, so not timed). GB/s counts the K/V bytes that must be read
    (B * ctx * kv_heads * D * 2 tensors) plus q and out, and its fraction of the copy bandwidth;
  * a sweep of the kernel's knobs (BLOCK_N, warps, stages, partitions) on the headline shape.
Every time is the median over repeats of CUDA-graph replays; one replay cycles through enough
distinct block tables (disjoint blocks of one pool) that the K/V read cannot stay in L2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import time_graph as kernel_time_graph  # noqa: E402
from punica_core.model.attention import paged_attention_ref  # noqa: E402
from punica_core.model.attention_triton import (choose_num_partitions,  # noqa: E402
                                                paged_decode_attention)

MODELS = {"llama-2-7b": (32, 32, 128), "llama-2-13b": (40, 40, 128), "smollm2-135m": (9, 3, 64)}
ROTATE_BYTES = 256 << 20        # K/V bytes one replay cycles through (> 5x the H200's L2)
BLOCK = 16


def time_graph(body, calls, target_ms=20.0, repeats=5):
    """Median seconds of one of the `calls` calls that `body` makes (kernels.py's timer)."""
    return kernel_time_graph(body, calls, target_ms, repeats)[0]


def copy_bandwidth(dtype):
    src = torch.randn(1 << 30, device="cuda", dtype=dtype)
    dst = torch.empty_like(src)
    t = time_graph(lambda: dst.copy_(src), 1)
    nbytes = src.numel() * src.element_size() * 2
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / t


class Case:
    """One shape: a shared K/V pool and `copies` disjoint shuffled block tables."""

    def __init__(self, B, H, KVH, D, ctx, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        per_copy = B * ctx * KVH * D * 2 * torch.empty((), dtype=dtype).element_size()
        self.copies = max(1, min(32, -(-ROTATE_BYTES // per_copy)))
        nb = -(-ctx // BLOCK)
        total = self.copies * B * nb
        perm = torch.randperm(total, generator=g).view(self.copies, B, nb).int()
        self.k = torch.randn(total * BLOCK, KVH, D, device="cuda", dtype=dtype)
        self.v = torch.randn_like(self.k)
        self.q = torch.randn(B, H, D, device="cuda", dtype=dtype)
        self.out = torch.empty_like(self.q)
        self.tables = [perm[c].cuda() for c in range(self.copies)]
        self.lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        pos = torch.arange(ctx, device="cuda")
        self.layouts = [SimpleNamespace(                        # what paged_attention_ref reads
            decode_rows=torch.arange(B, device="cuda"),
            decode_kv_index=t[:, pos // BLOCK].long() * BLOCK + pos % BLOCK,    # [B, ctx]
            decode_kv_mask=torch.ones(B, ctx, dtype=torch.bool, device="cuda"),
            prefills=[]) for t in self.tables]
        self.scale = D ** -0.5
        self.bytes = per_copy + 2 * self.q.numel() * self.q.element_size()

    def ours(self, **kw):
        def body():
            for t in self.tables:
                paged_decode_attention(self.q, self.k, self.v, t, self.lens, BLOCK, self.scale,
                                       out=self.out, **kw)
        return body

    def ref(self):
        def body():
            for lay in self.layouts:
                paged_attention_ref(self.q, self.k, self.v, lay, self.scale)
        return body

    def max_err(self):
        a = paged_decode_attention(self.q, self.k, self.v, self.tables[0], self.lens, BLOCK,
                                   self.scale)
        b = paged_attention_ref(self.q, self.k, self.v, self.layouts[0], self.scale)
        return (a.float() - b.float()).abs().max().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, no knob sweep")
    ap.add_argument("--no-ref", action="store_true", help="skip the torch reference timings")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth(dtype)
    res = {"device": props.name, "sms": props.multi_processor_count, "dtype": args.dtype,
           "block_size": BLOCK, "copy_bandwidth_GBps": bw / 1e9, "torch": torch.__version__,
           "cases": [], "sweep": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except Exception:                                       # noqa: BLE001
        pass
    models = ["llama-2-7b"] if args.quick else list(MODELS)
    batches = [1, 32] if args.quick else [1, 8, 32]
    ctxs = [256, 2048] if args.quick else [256, 512, 1024, 2048, 4096]
    for model in models:
        H, KVH, D = MODELS[model]
        for B in batches:
            for ctx in ctxs:
                c = Case(B, H, KVH, D, ctx, dtype)
                row = {"model": model, "B": B, "ctx": ctx, "heads": H, "kv_heads": KVH,
                       "head_dim": D, "partitions": choose_num_partitions(B, KVH, ctx,
                                                                         c.q.device),
                       "max_abs_err_vs_ref": c.max_err()}
                for name, body in [("ours", c.ours()), ("ours_single_pass",
                                                        c.ours(num_partitions=1))] + \
                        ([] if args.no_ref else [("ref", c.ref())]):
                    try:
                        t = time_graph(body, c.copies)
                    except Exception as e:                  # noqa: BLE001 - record, go on
                        row[name + "_error"] = repr(e)[:300]
                        continue
                    row[name + "_us"] = t * 1e6
                    row[name + "_GBps"] = c.bytes / t / 1e9
                    row[name + "_frac_copy_bw"] = c.bytes / t / bw
                if "ref_us" in row and "ours_us" in row:
                    row["speedup_vs_ref"] = row["ref_us"] / row["ours_us"]
                res["cases"].append(row)
                print(json.dumps(row), flush=True)
                del c
                torch.cuda.empty_cache()
    if not args.quick:      # knobs on the headline shapes, to pick the defaults
        H, KVH, D = MODELS["llama-2-7b"]
        for ctx in (1024, 2048):
            c = Case(32, H, KVH, D, ctx, dtype)
            configs = [dict(block_n=n, num_warps=w, num_stages=s)
                       for n in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3, 4)]
            configs += [dict(num_partitions=p) for p in (1, 2, 3, 4, 8)]
            for kw in configs:
                try:
                    t = time_graph(c.ours(**kw), c.copies, target_ms=10.0, repeats=3)
                    row = dict(kw, B=32, ctx=ctx, us=t * 1e6, frac_copy_bw=c.bytes / t / bw)
                except Exception as e:                      # noqa: BLE001
                    row = dict(kw, B=32, ctx=ctx, error=repr(e)[:300])
                res["sweep"].append(row)
                print(json.dumps(row), flush=True)
            del c
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
