"""Diagnostic: the fused kernel's two paths for ranks above its staged block, A/B by process.

    python benchmarks/diag/large_rank_paths.py                              # chunked (default)
    PUNICA_FUSED_LARGE=streamed python benchmarks/diag/large_rank_paths.py  # the older path

Cases where a job's rank exceeds the rows the staged slices hold (csrc/lora_fused.cu,
fused_shape): Llama-2-7B rank 64 (rank-64 pool, 8 CTAs a job stage 32 rows or fewer), 13B
gate/up and down at rank 16 (13 rows staged), and kernels.py's mixed-rank batch. Timed as
benchmarks/kernels.py does (bench_decode_case: CUDA-graph chains, weights rotated past L2);
percentages against a fixed 4.22 TB/s, the copy bandwidth kernels.py measured on the same
H200 earlier that session (4221 GB/s), not re-measured here.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))          # benchmarks/kernels.py
sys.path.insert(0, os.path.join(HERE, "..", ".."))    # the repo

import kernels as K  # noqa: E402
from punica_core.ops import cuda_backend  # noqa: E402

COPY_BW = 4.22e12
PATH = os.environ.get("PUNICA_FUSED_LARGE", "chunked")


def frac(r, key):
    return 100 * r["adapter_bytes"] / r[key] / COPY_BW


def main():
    assert cuda_backend.available(), "needs the CUDA kernels"
    cases = [("llama-2-7b", s, 64) for s in ("qkvo", "gate_up", "down")] + \
            [("llama-2-13b", s, 16) for s in ("gate_up", "down")]
    for model, shape, rank in cases:
        fin, fout = K.shapes_of(model)[shape]
        pool = K.Pool(fin, fout, rank, [rank] * K.POOL_SLOTS)
        r = K.bench_decode_case(pool, fin, fout, 32, 32, [rank] * 32, baselines=False)
        print(PATH, model[8:], shape, rank,
              "ours %.2f us %.0f%% x_ready %.2f us %.0f%%" % (
                  r["ours_s"] * 1e6, frac(r, "ours_s"), r["ours_x_ready_s"] * 1e6,
                  frac(r, "ours_x_ready_s")), flush=True)
        del pool
        torch.cuda.empty_cache()
    mix = [4, 8, 16, 64, 128] * 6
    for shape, (fin, fout) in K.shapes_of("llama-2-7b").items():
        pool = K.Pool(fin, fout, 128, [128] * K.POOL_SLOTS)
        r = K.bench_decode_case(pool, fin, fout, 30, 30, mix, no_adapter_rows=2, baselines=False)
        print(PATH, "mixed", shape, "ours %.1f us %.0f%% x_ready %.0f%% pair %.0f%%" % (
            r["ours_s"] * 1e6, frac(r, "ours_s"), frac(r, "ours_x_ready_s"), frac(r, "pair_s")),
            flush=True)
        del pool
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
