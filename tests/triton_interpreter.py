"""Runs Triton kernels on the CPU: a test script in a fresh Python with TRITON_INTERPRET=1."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed")


# run before every script: numpy >= 2.4 refuses int() of a 1-element 1-d array, which triton's
# interpreter uses for scalars such as loop bounds loaded from memory; give it .item() instead
PREAMBLE = r"""
import sys
import numpy as np
try:
    int(np.array([1]))
except TypeError:
    import triton.runtime.interpreter as _I
    _orig = _I._patch_lang_tensor
    def _patched(tensor, scope):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    _I._patch_lang_tensor = _patched
sys.path.insert(0, "tests/model")
"""


def run_in_interpreter(script: str) -> list:
    """The JSON list that `script` prints on its last 'RESULTS ' line (it must exit 0).
    The script runs after PREAMBLE, which also puts tests/model on sys.path."""
    # the script imports the test modules, which import this one
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    r = subprocess.run([sys.executable, "-c", PREAMBLE + script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])
