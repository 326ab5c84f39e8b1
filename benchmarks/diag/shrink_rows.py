"""Diagnostic: the prefill shrink's time by row count, for A/B runs of its kernels
(PUNICA_SHRINK_BULK=0 / 1: sgmv_shrink.cu's split-K kernel / sgmv_shrink_bulk.cu's), to place
the auto dispatch's threshold. 7B shapes, segments of 512 rows (the last one shorter), CUDA
graphs of 8 calls cycling through 8 weight slots.

    PUNICA_SHRINK_BULK=0 python benchmarks/diag/shrink_rows.py old
    PUNICA_SHRINK_BULK=1 python benchmarks/diag/shrink_rows.py bulk

Prints only."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import kernels as K  # noqa: E402
from punica_core.ops import cuda_backend  # noqa: E402

assert cuda_backend.available(), "needs the CUDA kernels"
label = sys.argv[1] if len(sys.argv) > 1 else ""
calls, DT = 8, torch.bfloat16
for fin in (4096, 11008):
    for rank in (16, 64):
        a = torch.randn(calls, 1, rank, fin, device="cuda", dtype=DT) * fin ** -0.5
        ranks = torch.full((calls,), rank, dtype=torch.int32, device="cuda")
        for rows in (512, 1024, 2048, 3072, 4096, 6144, 8192):
            x = torch.randn(rows, fin, device="cuda", dtype=DT)
            v = torch.empty(rows, rank, device="cuda", dtype=DT)
            cuts = list(range(0, rows, 512)) + [rows]
            indptr = torch.tensor(cuts, dtype=torch.int32, device="cuda")
            slots = [torch.tensor([(c + i) % calls for i in range(len(cuts) - 1)],
                                  dtype=torch.int32, device="cuda") for c in range(calls)]

            def body():
                for c in range(calls):
                    torch.ops.punica.sgmv_shrink(v, x, a, indptr, slots[c], ranks, 0)

            t, _ = K.time_graph(body, calls)
            print(f"{label} in {fin:5d} r{rank:<3d} rows {rows:5d}: {t * 1e6:7.1f} us "
                  f"{rows * fin * 2 / t / 1e9:6.0f} GB/s of x", flush=True)
