#!/usr/bin/env bash
# Create .venv (once) and install the project with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch exactly pinned: this picks the CPU build; a looser spec pulls CUDA wheels. One pip call
# (one resolution); --no-compile: modules are byte-compiled when first imported, not all of
# torch's up front (a fresh install takes 1 min 6 s instead of 1 min 44 s).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile \
  "torch==2.13.0" -e ".[dev]"
