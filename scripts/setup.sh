#!/usr/bin/env bash
# Create .venv (once) and install the project with its pinned dependencies. Idempotent: when
# pyproject.toml has not changed since the last install, nothing is run (no pip output, no
# 20 s of resolution before every run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.clinical-fl-installed
wanted="$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.version_info[:2])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && .venv/bin/python -c 'import fl_app' 2>/dev/null; then
  exit 0
fi
# torch exactly pinned: this picks the CPU build; a looser spec pulls CUDA wheels. One pip call,
# one resolution. Byte-compiling at install stays on: where PYTHONDONTWRITEBYTECODE is set (as
# on CI), modules not compiled here are compiled again by every process that imports them
# (measured: the suite took 16 min instead of 9 with --no-compile).
# (A pip configured with find-links folders that do not exist warns once per package and
# folder: those lines are left out; every other message of pip's stays.)
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]" \
  2> >(grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$" >&2)
echo "$wanted" > "$stamp"
