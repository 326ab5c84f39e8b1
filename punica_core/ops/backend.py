"""Finds the CUDA extension. Importing this never compiles anything and never fails."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=1)
def cuda_ops():
    """The CUDA backend module, or None when there is no GPU or the extension is unavailable.

    PUNICA_BACKEND=torch forces the reference path (for A/B tests on a GPU).
    """
    if os.environ.get("PUNICA_BACKEND", "").lower() == "torch":
        return None
    import torch
    if not torch.cuda.is_available():
        return None
    try:
        from . import cuda_backend
    except ImportError:
        return None
    return cuda_backend if cuda_backend.available() else None
