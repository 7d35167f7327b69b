# Sourced by the run and test scripts: the offline Flower environment (written once, in
# fl_app/commands/flower_env.py) and the project's executables first on PATH.
export PATH="$PWD/.venv/bin:$PATH"  # flower-superlink spawns flwr-* executables by name
eval "$(.venv/bin/python -m fl_app.commands.flower_env)"
