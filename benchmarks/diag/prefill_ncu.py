"""Diagnostic: one call each of the prefill kernels (7B q/k/v/o shape, 4096 rows in segments of
512, ranks 16 and 64) and of the dense torch references, between cudaProfilerStart/Stop, for
Nsight Compute:

    ncu --profile-from-start off --clock-control none --set full -o prefill \
        python benchmarks/diag/prefill_ncu.py

Everything runs once before the profiled range (JIT build, cuBLAS heuristics, caches)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]
from punica_core.ops import cuda_backend  # noqa: E402

assert cuda_backend.available(), "needs the CUDA kernels"
DT, ROWS, SEG, SLOTS = torch.bfloat16, 4096, 512, 16
fin = fout = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
x = torch.randn(ROWS, fin, device="cuda", dtype=DT)
y = torch.randn(ROWS, fout, device="cuda", dtype=DT)
v = torch.randn(ROWS, 64, device="cuda", dtype=DT)
a = torch.randn(SLOTS, 1, 64, fin, device="cuda", dtype=DT) * fin ** -0.5
b = torch.randn(SLOTS, 1, 64, fout, device="cuda", dtype=DT) * 0.05
indptr = torch.arange(0, ROWS + 1, SEG, dtype=torch.int32, device="cuda")
slots = torch.arange(ROWS // SEG, dtype=torch.int32, device="cuda")


def cases(rank):
    ranks = torch.full((SLOTS,), rank, dtype=torch.int32, device="cuda")
    return [
        lambda: torch.ops.punica.sgmv_shrink(v, x, a, indptr, slots, ranks, 0),
        lambda: torch.matmul(x, a[0, 0, :rank].t()),
        lambda: torch.ops.punica.sgmv_expand(y, v, b, indptr, slots, ranks, 0, 0),
        lambda: torch.matmul(v[:, :rank], b[0, 0, :rank]),
        lambda: y.addmm_(v[:, :rank], b[0, 0, :rank]),
    ]


all_cases = cases(16) + cases(64)
for f in all_cases:
    f()
torch.cuda.synchronize()
torch.cuda.profiler.start()
for f in all_cases:
    f()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("profiled", len(all_cases), "calls")
