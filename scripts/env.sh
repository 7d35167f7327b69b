# Sourced by the run and test scripts: offline Flower, project-local Flower home.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # never uv-sync dependencies per run
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TQDM_DISABLE=1
export PATH="$PWD/.venv/bin:$PATH"  # flower-superlink spawns flwr-* executables by name
