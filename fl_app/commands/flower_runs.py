"""The outcome of a ``flwr run``. ``flwr run --stream`` exits 0 even when the ServerApp
failed, so whoever starts a run asks the SuperLink for its final status.

    python -m fl_app.commands.flower_runs RUN_ID [CONNECTION]   # exit 0 only if it completed
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from fl_app.commands.flower_env import flower_executable

_STARTED = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"


def started_run_id(output: str) -> str | None:
    """The run id that ``flwr run`` printed, if it started one."""
    match = _STARTED.search(output)
    return match.group(1) if match else None


def run_status(run_id: str, connection: str | None = None,
               env: dict[str, str] | None = None) -> tuple[str, str]:
    """(status, details) of a run, e.g. ("finished:failed", "Simulation failed with ...")."""
    command = [flower_executable("flwr"), "ls"] + ([connection] if connection else []) + [
        "--run-id", run_id, "--format", "json"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return "unknown", (out.stdout + out.stderr).strip()
    if not runs:
        return "unknown", f"run {run_id} not found"
    return runs[0]["status"], runs[0].get("status-details", "")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    status, details = run_status(args[0], args[1] if len(args) > 1 else None)
    print(f"run {args[0]}: {status}" + (f" ({details})" if details not in ("", "N/A") else ""))
    return 0 if status == COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
