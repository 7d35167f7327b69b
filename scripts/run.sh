#!/usr/bin/env bash
# Set up (once) and run the federated fine-tuning as a local Flower simulation.
#   bash scripts/run.sh                                   # defaults: 2 hospitals, MiniLM, 4 rounds
#   bash scripts/run.sh --run-config "num-server-rounds=6 privacy='dp_sgd'"
#   bash scripts/run.sh --run-config "overrides='train.local_epochs=2 strategy=fedprox'"
#   bash scripts/run.sh --federation-config "num-supernodes=3"
# It ends with the MLflow run id and the commands that come next (UI, predict, serve).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
# Keys and values are checked here, in seconds, naming what is wrong (Flower's own check
# says only "Invalid run configuration").
python -m fl_app.commands.run_config_check "$@"
# flwr run starts a local SuperLink when none is running and leaves it behind: if this run
# starts it, it is stopped (by its PID) when the run ends.
if ! python -m fl_app.commands.local_superlink running; then
  trap 'python -m fl_app.commands.local_superlink stop' EXIT
fi
log="$(mktemp)"
flwr run . --stream "$@" 2>&1 | tee "$log"
run_id="$(python -c 'import sys; from fl_app.commands.flower_runs import started_run_id; print(started_run_id(open(sys.argv[1]).read()) or "")' "$log")"
rm -f "$log"
[ -n "$run_id" ] || { echo "flwr run did not start a run" >&2; exit 1; }
# flwr run exits 0 even when the run failed: ask the SuperLink how it ended.
status="$(python -m fl_app.commands.flower_runs "$run_id")" || { echo "$status" >&2; exit 1; }
