"""Diagnostic: the paged Triton prefill attention (model/attention_prefill_triton.py) against
the torch reference (gather + SDPA per chunk, model/attention.py) for one layer of Llama-2-7B
or 13B heads, by chunk length and number of chunks, with and without earlier context, and
how far apart their outputs are. Writes JSON.

    python benchmarks/diag/prefill_attention.py --out /tmp/prefill_attention.json

Why: steps that prefill could replay from CUDA graphs only with a capturable attention
(engine/mixed_graphs.py); where prompts are long the step is GPU-bound, and this kernel must
not be much slower than SDPA's there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import _time_ms, check_device, log, write_json  # noqa: E402
from punica_core.engine.layout import ScheduledChunk, build_layout  # noqa: E402
from punica_core.model.attention import paged_attention_ref  # noqa: E402
from punica_core.model.attention_prefill_triton import paged_prefill_attention  # noqa: E402

SHAPES = {"llama-2-7b": (32, 32, 128), "llama-2-13b": (40, 40, 128)}


def case(chunks: list[tuple[int, int]], H: int, KVH: int, D: int, bs: int, dtype, device):
    """q rows of the chunks, a KV cache with every chunk's context, both paths' metadata."""
    g = torch.Generator().manual_seed(0)
    sched, starts, row, block = [], [], 0, 0
    for first, n in chunks:
        blocks = -(-(first + n) // bs)
        sched.append(ScheduledChunk([1] * n, first, list(range(block, block + blocks)), -1,
                                    True))
        starts.append(row)
        row += n
        block += blocks
    k = torch.randn(block * bs, KVH, D, generator=g).to(device, dtype)
    v = torch.randn(block * bs, KVH, D, generator=g).to(device, dtype)
    q = torch.randn(row, H, D, generator=g).to(device, dtype)
    layout = build_layout(sched, bs, device, paged_prefill=True)
    return q, k, v, layout


def timed(fn, reps: int) -> float:
    """Median CUDA-event ms of fn over reps (common._time_ms: after one warm-up)."""
    return statistics.median(_time_ms(fn, "cuda", reps))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama-2-7b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="/tmp/prefill_attention.json")
    args = ap.parse_args(argv)
    device = check_device("cuda")
    H, KVH, D = SHAPES[args.model]
    scale = D ** -0.5
    cases = {f"{c}x{n}" + (f"@{f}" if f else ""): [(f, n)] * c
             for c, n, f in ((1, 128, 0), (1, 512, 0), (1, 2048, 0), (4, 128, 0), (32, 128, 0),
                             (1, 128, 1024), (8, 256, 512))}
    out = {"model": args.model, "heads": H, "kv_heads": KVH, "head_dim": D,
           "block_size": args.block_size, "dtype": "bfloat16", "cases": {}}
    for name, chunks in cases.items():
        q, k, v, layout = case(chunks, H, KVH, D, args.block_size, torch.bfloat16, device)
        pt = layout.prefill_tables
        ref = paged_attention_ref(q, k, v, layout, scale)
        got = paged_prefill_attention(q, k, v, pt.starts, pt.lens, pt.first_pos,
                                      pt.block_tables, args.block_size, scale,
                                      max_chunk_rows=pt.max_rows)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        r = {"rows": q.shape[0], "chunks": len(chunks),
             "reference_ms": timed(lambda: paged_attention_ref(q, k, v, layout, scale),
                                   args.reps),
             "kernel_ms": timed(lambda: paged_prefill_attention(
                 q, k, v, pt.starts, pt.lens, pt.first_pos, pt.block_tables, args.block_size,
                 scale, max_chunk_rows=pt.max_rows), args.reps),
             "max_abs_error_vs_reference_max": err}
        r["kernel_vs_reference"] = r["kernel_ms"] / r["reference_ms"]
        out["cases"][name] = r
        log(name, json.dumps(r))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
