#!/usr/bin/env bash
# Set up (once) and run the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
ruff check .
# Two workers, one test file each at a time (a module's SuperLink or deployment stays in its
# worker); PYTEST_WORKERS=0 runs in this process.
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
