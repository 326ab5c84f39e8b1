"""`linear(x, weight, bias)`: F.linear, with the fastest exact fp32 formulation on CPU.

On GPU, and for any dtype other than float32, it is exactly F.linear. On CPU in float32,
torch's F.linear goes to MKL's sgemm, which on the machine measured (AMD EPYC, AVX-512, 2
threads, weights streamed from DRAM) reads a decode step's weights at only 10-16 GB/s and is
half as fast as it could be even for 512-row prefill chunks. Two fp32 formulations of the same
product do better there (benchmarks: us per call, weights cycled so they do not sit in L3):

    rows:                        1      2-4       8      64     512
    gate_up [3072, 576]
      F.linear (MKL)           418   600-800     516    1327    8153
      W @ x.T (MKL)            420   160-200     327    1265    8162
      oneDNN linear            128   250-300     272     689    3819
    down [576, 1536]
      F.linear                 165   270-500     227     668    4117
      W @ x.T                  164    80-130     288     636    4119
      oneDNN linear            112   100-110     130     420    1927

So: oneDNN's fp32 inner-product (`torch.ops.mkldnn._linear_pointwise`, what torch itself uses
for bf16 on CPU) for every row count, except 2-4 rows with at most 1024 input features, where
W @ x.T (made contiguous again) is faster still. Both accumulate in fp32; they differ from
F.linear only in summation order (tests/model/test_linear.py). Weights keep their layout:
nothing is copied or prepacked, so memory is not doubled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# 2-4 rows: W @ x.T beats oneDNN for these input widths (qkv, o, gate_up, lm_head: 576);
# for wider inputs (down: 1536) it loses again from 3 rows on.
WXT_MIN_ROWS, WXT_MAX_ROWS, WXT_MAX_IN = 2, 4, 1024


def _onednn_linear():
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        w = torch.ones(3, 2)
        out = op(torch.ones(1, 2), w, None, "none", [], "")
        return op if out.shape == (1, 3) and bool((out == 2).all()) else None
    except (AttributeError, RuntimeError):
        return None


_DNN = _onednn_linear()


def formulation(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which product `linear` uses: 'f.linear', 'wxt' or 'onednn'."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 \
            or x.dim() != 2 or weight.dim() != 2:
        return "f.linear"
    rows = x.shape[0]
    if WXT_MIN_ROWS <= rows <= WXT_MAX_ROWS and weight.shape[1] <= WXT_MAX_IN:
        return "wxt"
    return "onednn" if _DNN is not None and weight.is_contiguous() else "f.linear"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           how: str | None = None) -> torch.Tensor:
    """x: [T, in] @ weight[out, in].T (+ bias) -> [T, out], contiguous. `how` forces a
    formulation (tests, benchmarks); by default `formulation(x, weight)` picks it."""
    how = how or formulation(x, weight)
    if how == "onednn":
        return _DNN(x, weight, bias, "none", [], "")
    if how == "wxt":
        out = torch.matmul(weight, x.t()).t().contiguous()
        return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)
