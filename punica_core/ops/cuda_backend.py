"""The CUDA backend: SGMV kernels from csrc/, registered as torch.ops.punica.*.

Loading order (in `available()`, never at import time):
  1. the prebuilt extension `punica_core._sgmv_C` (`pip install -e . --no-build-isolation` on a
     machine with a CUDA toolkit and a CUDA build of torch);
  2. otherwise, on a machine where torch sees a GPU, a just-in-time build of csrc/ with
     torch.utils.cpp_extension.load (ninja) for that GPU only, cached under
     $TORCH_EXTENSIONS_DIR or ~/.cache/punica_playground/torch_ext (rebuilt when csrc/ changes).
Without CUDA nothing is imported or compiled and `available()` is False.

Kernel notes (see docs/KERNELS.md): fp16/bf16 with fp32 accumulation; ranks 1..128 mixed in one
launch; decode batches run memory-bound CUDA-core kernels, prefill chunks tensor-core kernels;
add_lora runs shrink + expand of up to 4 projections as one fused launch for decode batches on
sm_90 (thread-block clusters), else as a pair per projection.
On sm_90 the decode kernels (add_lora's fused one too) use programmatic dependent launch: they
may read seg_indptr, slot_ids, ranks and the weights before the kernel launched just before them
on the stream has finished (never x, v or y, unless add_lora is told x_ready). Those tensors
must therefore not be written by a kernel the op may overlap: the kernel launched immediately
before it, and, where that one is itself one of these decode kernels (each lets its successor
start at its own start), the one before that, and so on back to the first other kernel;
copies (H2D, cudaMemcpy) and anything before that are fine.
Pass pdl=False to torch.ops.punica.* to switch it off.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
source = None          # "prebuilt" or "jit" once loaded


def _cache_dir(capability: tuple[int, int]) -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "punica_playground" / "torch_ext"
    tag = f"torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda}_sm{capability[0]}{capability[1]}"
    path = root / tag.replace(".", "")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_build() -> None:
    import sys
    from torch.utils.cpp_extension import load
    sys.path.insert(0, str(CSRC))
    try:
        import build_ext_config as cfg
    finally:
        sys.path.remove(str(CSRC))
    cap = torch.cuda.get_device_capability()
    load(name="punica_sgmv_jit", sources=cfg.sources(), extra_include_paths=[str(CSRC)],
         extra_cflags=cfg.CXX_FLAGS, extra_cuda_cflags=cfg.NVCC_FLAGS + cfg.gencode_for(cap),
         build_directory=str(_cache_dir(cap)), is_python_module=True, verbose=False)


def _register_fakes() -> None:
    """Shape-only implementations so torch.compile can trace through the (mutating) ops."""
    def shrink_fake(v, x, a, seg_indptr, slot_ids, ranks, layer, path=0, pdl=True):
        return None

    def expand_fake(y, v, b, seg_indptr, slot_ids, ranks, layer, col_offset=0, path=0, pdl=True):
        return None

    def add_lora_fake(y, x, v, a, b, ranks, col_offsets, seg_indptr, slot_ids, layer, path=0,
                      cluster=0, pdl=True, accumulate=True, ctas=0, x_ready=False,
                      rank_bound=0):
        return None

    for name, fn in (("punica::sgmv_shrink", shrink_fake), ("punica::sgmv_expand", expand_fake),
                     ("punica::add_lora", add_lora_fake)):
        try:
            torch.library.register_fake(name)(fn)
        except RuntimeError:   # already registered (module reloaded)
            pass


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the kernels are loaded on a CUDA device (loads or builds them on first call)."""
    global source
    if not torch.cuda.is_available():
        return False
    try:
        import punica_core._sgmv_C  # noqa: F401
        source = "prebuilt"
    except ImportError:
        if os.environ.get("PUNICA_NO_JIT"):
            return False
        try:
            _jit_build()
            source = "jit"
        except Exception as e:  # no nvcc, compiler error...: the torch reference takes over
            log.warning("punica: CUDA kernels unavailable, using the torch reference (%s)", e)
            return False
    _register_fakes()
    return True


def _index(t, device) -> torch.Tensor:
    """seg_indptr / slot_ids / ranks as int32 on the device (lists are copied there)."""
    if isinstance(t, torch.Tensor):
        if t.device == device and t.dtype == torch.int32:
            return t
        return t.to(device=device, dtype=torch.int32)
    return torch.tensor(list(t), dtype=torch.int32, device=device)


def sgmv_shrink(v: torch.Tensor, x: torch.Tensor, a: torch.Tensor, seg_indptr, slot_ids, ranks,
                layer: int) -> torch.Tensor:
    """v[rows, :r] = x[rows] @ a[slot, layer, :r].T per segment; returns v.

    v: [n, >=max_rank]; x: [n, in]; a: [slots, layers, max_rank, in] (contiguous), all the same
    dtype (fp16 or bf16) on one GPU. seg_indptr [num_seg+1], slot_ids [num_seg], ranks [slots]:
    int32 device tensors (lists or other int tensors are converted).
    """
    dev = x.device
    torch.ops.punica.sgmv_shrink(v, x, a, _index(seg_indptr, dev), _index(slot_ids, dev),
                                 _index(ranks, dev), int(layer))
    return v


def sgmv_expand(y: torch.Tensor, v: torch.Tensor, b: torch.Tensor, seg_indptr, slot_ids, ranks,
                layer: int, col_offset: int = 0) -> torch.Tensor:
    """y[rows, off:off+out] += v[rows, :r] @ b[slot, layer, :r] per segment; returns y.

    y: [n, >= col_offset + out]; v: [n, >=max_rank]; b: [slots, layers, max_rank, out].
    """
    dev = y.device
    torch.ops.punica.sgmv_expand(y, v, b, _index(seg_indptr, dev), _index(slot_ids, dev),
                                 _index(ranks, dev), int(layer), int(col_offset))
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor, projections, seg_indptr, slot_ids,
             layer: int, accumulate: bool = True, cluster: int = 0, ctas: int = 0,
             path: int = 0, x_ready: bool = False, rank_bound: int = 0) -> torch.Tensor:
    """y[rows, off:off+out] += (x @ a[slot, layer, :r].T) @ b[slot, layer, :r] for each
    (a, b, ranks, col_offset) in `projections` (1 to 4, all reading x); returns y.
    accumulate=False overwrites the windows instead (= rather than +=; rows without an adapter
    get zeros), so a delta buffer needs no zeroing first; the segments must cover every row.
    cluster: CTAs per (segment, projection) of the fused kernel, 0 = chosen by the kernel.
    ctas > 0: decode batches on sm_90 run the streamed kernel on that many CTAs instead (for a
    launch beside a GEMM, on the SMs it leaves free). path: 0 auto; 3 fused, 4 / 5 streamed
    with bulk / cp.async copies, 1 / 2 the pair (tests, benchmarks).
    x_ready: x obeys the same rule as the weights (not written by a kernel the op may overlap,
    see the module's docstring), as when it was written before another kernel, or on another
    stream the op's stream waited for. The fused kernel then computes the whole delta before
    its dependency wait and waits only to read and write y, so a chain of launches on one
    input (q, k and v as separate calls, or a benchmark's loop) overlaps all but that last step
    of each launch with the one before. A wrong x_ready can read a stale x: keep it False
    when unsure. The other kernels ignore it.
    rank_bound: no segment's rank exceeds it (0: unknown, the pools' max rank): the fused
    kernel shapes its launch for it (an eager step of rank-16 adapters in a rank-64 pool stages
    16 rank rows and launches no parts past them). A rank above it still gives the right
    delta, on a slower path.

    One fused launch for decode batches on sm_90 (v untouched); otherwise a shrink + expand
    pair per projection through v ([n, >= max_rank]).
    """
    dev = x.device
    a, b, ranks, offs = zip(*projections)
    torch.ops.punica.add_lora(y, x, v, list(a), list(b), [_index(r, dev) for r in ranks],
                              [int(o) for o in offs], _index(seg_indptr, dev),
                              _index(slot_ids, dev), int(layer), path=int(path),
                              cluster=int(cluster), accumulate=accumulate, ctas=int(ctas),
                              x_ready=bool(x_ready), rank_bound=int(rank_bound))
    return y
