#!/usr/bin/env bash
# Set up (once) and run the federated fine-tuning as a local Flower simulation.
#   bash scripts/run.sh                                   # defaults: 2 hospitals, MiniLM, 4 rounds
#   bash scripts/run.sh --run-config "overrides='num_rounds=5 strategy=fedprox'"
#   bash scripts/run.sh --federation-config "num-supernodes=3"
# Results: MLflow store under mlruns/ (see README for the UI).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
log="$(mktemp)"
flwr run . --stream "$@" 2>&1 | tee "$log"
run_id="$(python -c 'import sys; from fl_app.flower_runs import started_run_id; print(started_run_id(open(sys.argv[1]).read()) or "")' "$log")"
rm -f "$log"
[ -n "$run_id" ] || { echo "flwr run did not start a run" >&2; exit 1; }
python -m fl_app.flower_runs "$run_id"
