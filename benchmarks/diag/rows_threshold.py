"""Diagnostic: where should decode-shaped batches with several rows per adapter leave the fused
kernel for the tensor-core pair?

    python benchmarks/diag/rows_threshold.py      # on a GPU with the kernels (sm_90)

Times add_lora auto (path 0: fused up to 8 rows per segment), forced fused
(path 3, MT = 4 passes; also with x_ready and with 16 CTAs a job) and the MMA pair (path 2),
Llama-2-7B shapes, rank 16, 64 calls per CUDA graph cycling through slots and layers (kernels.py's
timing). Prints one line per case; no JSON yet (a diagnostic for the dispatch threshold)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import kernels as K  # noqa: E402
from punica_core.ops import cuda_backend  # noqa: E402

assert cuda_backend.available(), "needs the CUDA kernels"
cases = [(16, 1), (24, 1), (32, 1), (64, 1), (128, 1), (16, 2), (32, 2), (64, 2), (32, 4),
         (64, 4), (128, 8), (128, 16)]
for name, (fin, fout) in K.shapes_of("llama-2-7b").items():
    pool = K.Pool(fin, fout, 16, [16] * K.POOL_SLOTS)
    for rows, adapters in cases:
        per = rows // adapters
        indptr = torch.arange(0, rows + 1, per, dtype=torch.int32, device="cuda")
        calls = 64
        slots = [torch.tensor([(c * adapters + i) % K.POOL_SLOTS for i in range(adapters)],
                              dtype=torch.int32, device="cuda") for c in range(calls)]
        x = torch.randn(rows, fin, device="cuda", dtype=K.DT)
        y = torch.zeros(rows, fout, device="cuda", dtype=K.DT)
        v = torch.zeros(rows, 16, device="cuda", dtype=K.DT)

        def body_of(path, cluster=0, x_ready=False):
            def body():
                for c in range(calls):
                    torch.ops.punica.add_lora(y, x, v, [pool.a], [pool.b], [pool.ranks], [0],
                                              indptr, slots[c], c % K.POOL_LAYERS, path,
                                              cluster, x_ready=x_ready)
            return body
        t = {k: K.time_graph(body_of(*a), calls)[0] * 1e6 for k, a in
             (("auto", (0,)), ("fused", (3,)), ("fused_xr", (3, 0, True)),
              ("fused_c16", (3, 16)), ("mma_pair", (2,)))}
        print(f"{name:>7} rows={rows:>3} A={adapters:>2} ({per:>3}/seg) " +
              "  ".join(f"{k} {us:6.1f}" for k, us in t.items()) + " us", flush=True)
