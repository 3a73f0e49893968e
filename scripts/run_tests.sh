#!/usr/bin/env bash
# Run the test suite on a fresh machine: makes .venv, installs what the tests need, runs pytest.
# The ComfyUI integration tests run when COMFYUI_PATH points at a ComfyUI checkout (they skip, saying
# so, otherwise); the CUDA build tests compile every kernel with NVRTC and need no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
fi
python -m pip install -q -r requirements.txt -r requirements-test.txt
if [ -n "${COMFYUI_PATH:-}" ]; then
    grep -vE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$COMFYUI_PATH/requirements.txt" > .venv/comfyui-requirements.txt
    # requests: ComfyUI's server imports it (app/frontend_management.py) without listing it
    python -m pip install -q -r .venv/comfyui-requirements.txt requests
fi
python -m pytest "$@"
