"""How the SGMV extension is built: used by setup.py (ahead of time) and by
punica_core/ops/cuda_backend.py (just in time, for the local GPU only).

Kept free of torch imports at module level so that setup.py can import it on any machine.
"""
from __future__ import annotations

import os

CSRC = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["sgmv_ops.cpp", "sgmv_shrink.cu", "sgmv_expand.cu", "sgmv_prefill.cu", "sgmv_expand_strip.cu", "sgmv_shrink_bulk.cu", "lora_fused.cu", "lora_stream.cu"]
HEADERS = ["sgmv.h", "sgmv_common.cuh", "tma.cuh"]
EXT_NAME = "punica_core._sgmv_C"   # the prebuilt module that cuda_backend imports first

# Ahead-of-time targets: Ampere (sm_80 machine code, runs on sm_86/89 too), Hopper with its
# arch-specific instructions (sm_90a), and compute_90 PTX so that newer GPUs can JIT it.
AOT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]

CXX_FLAGS = ["-O3"]   # torch adds its own -std
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]


def sources(absolute: bool = True) -> list[str]:
    return [os.path.join(CSRC, s) if absolute else os.path.join("csrc", s) for s in SOURCES]


def gencode_for(capability: tuple[int, int]) -> list[str]:
    """nvcc flags for one device (JIT builds compile for the GPU they run on, nothing else)."""
    major, minor = capability
    if (major, minor) == (9, 0):
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def extension_and_cmdclass():
    """(ext_modules, cmdclass) for setup.py; call only where torch has CUDA and nvcc exists."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name=EXT_NAME,
        sources=sources(absolute=False),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + AOT_GENCODE},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
