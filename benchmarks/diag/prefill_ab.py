"""Diagnostic: kernels.py's prefill cases (quick set), one line each, for A/B runs of one build
under two environment settings (PUNICA_SHRINK_* / PUNICA_EXPAND_* variables) or of two builds.

    python benchmarks/diag/prefill_ab.py narrow
    PUNICA_SHRINK_NARROW=0 PUNICA_EXPAND_NARROW=0 python benchmarks/diag/prefill_ab.py wide

Prints only; the committed figures come from kernels.py."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import kernels as K  # noqa: E402
from punica_core.ops import cuda_backend  # noqa: E402

assert cuda_backend.available(), "needs the CUDA kernels"
label = sys.argv[1] if len(sys.argv) > 1 else ""
for r in K.run_prefill(True):
    print(label, r["shape"], "r%d" % r["rank"], "seg %4d" % r["seg_len"],
          "shrink %.1f us = %.2f of dense, expand %.1f us = %.2f of matmul / %.2f of addmm" % (
              r["shrink_s"] * 1e6, r["shrink_frac_dense"], r["expand_s"] * 1e6,
              r["expand_frac_dense"], r["expand_frac_addmm"]), flush=True)
