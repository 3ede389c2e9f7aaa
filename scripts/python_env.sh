#!/usr/bin/env bash
# Creates .venv with the pinned Python test/bench dependencies (torch 2.11, transformers 5.17 — what the
# GPU machine has) and installs fusedmoe into it. Prints the venv's python path last.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  $PY -m venv .venv >&2
fi
if ! .venv/bin/python -c "import torch, transformers, pytest, nanobind, scikit_build_core, matplotlib" 2>/dev/null; then
  echo "[python] installing pinned dependencies into .venv (torch 2.11.0, transformers 5.17.0)" >&2
  .venv/bin/pip install -q --disable-pip-version-check torch==2.11.0 transformers==5.17.0 pytest numpy \
    matplotlib "nanobind>=2.0" "scikit-build-core>=0.10" ninja >&2
fi
export PATH="/usr/local/cuda/bin:$PATH"
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation . >&2
echo "$PWD/.venv/bin/python"
