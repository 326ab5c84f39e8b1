"""Diagnostic: the fused decode kernel on kernels.py's key cases, one line each, for A/B runs
of two builds (two checkouts, each with its own TORCH_EXTENSIONS_DIR) or of one build under two
environment settings (PUNICA_FUSED_* variables).

    python benchmarks/diag/decode_ab.py base        # the label starts each line
    SWEEP=1 python benchmarks/diag/decode_ab.py new # + x_ready / plain times by cluster size

Llama-2-7B, 32 rows: 32 distinct rank-16 adapters (rank-16 pool), 32 rank-64 adapters (rank-64
pool) and the mixed batch (ranks 4/8/16/64/128 x 6 + 2 rows without an adapter, rank-128 pool).
Timing and bandwidth as in kernels.py (bench_decode_case, against the copy bandwidth of the
same process). Prints only; the committed figures come from kernels.py."""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import kernels as K  # noqa: E402
from punica_core.ops import cuda_backend  # noqa: E402

assert cuda_backend.available(), "needs the CUDA kernels"
label = sys.argv[1] if len(sys.argv) > 1 else ""
bw = K.copy_bandwidth()
print(label, "copy bw %.0f GB/s" % (bw / 1e9))
cases = [("r16", 16, [16] * 32, 0), ("r64", 64, [64] * 32, 0),
         ("mixed", 128, [4, 8, 16, 64, 128] * 6, 2)]
for case, pool_rank, ranks, extra in cases:
    for name, (fin, fout) in K.shapes_of("llama-2-7b").items():
        pool = K.Pool(fin, fout, pool_rank, [pool_rank] * K.POOL_SLOTS)
        r = K.bench_decode_case(pool, fin, fout, len(ranks), len(ranks), ranks,
                                no_adapter_rows=extra, baselines=False,
                                sweep=bool(os.environ.get("SWEEP")) and case == "r16")
        K.finish_decode(r, bw)

        def pct(t):
            return 100 * r["adapter_bytes"] / t / bw

        by_c = {c: "%.0f%%" % pct(t) for c, t in r.get("ours_x_ready_by_cluster_s", {}).items()}
        print(label, case, name, "ours %.2f us %.0f%%, x_ready %.2f us %.0f%%, pair %.0f%%" % (
            r["ours_s"] * 1e6, pct(r["ours_s"]), r["ours_x_ready_s"] * 1e6,
            pct(r["ours_x_ready_s"]), 100 * r["pair_frac_copy_bw"]),
            ("x_ready by cluster size %s" % by_c) if by_c else "", flush=True)
        del pool
        torch.cuda.empty_cache()
