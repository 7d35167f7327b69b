"""The environment every Flower process of this product runs in: offline, quiet, no telemetry.

The one place it is written. ``clinical-fl`` and ``clinical-fl-audit`` add it to the
``flwr run`` they start, the tests to every process they start, and
``scripts/env.sh`` exports it for the shell (``python -m fl_app.commands.flower_env``).

Flower's executables (``flwr``, and ``flower-superlink``, ``flwr-simulation``, ... which a
SuperLink spawns by name) are installed next to the Python that runs this code (the venv's
``bin/``): they are looked up there first, then on PATH, and that folder goes first on the
PATH of every Flower process started from here, so ``.venv/bin/clinical-fl`` works without
an activated venv.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

OFFLINE_FLOWER_ENV = {
    # Never uv-sync the app's dependencies per run: they are installed, and there may be
    # no network beyond the package registries.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Models come from local folders or the packaged default, never from the hub at run time.
    "HF_HUB_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}


def python_bin() -> Path:
    """The folder of the running Python (a venv's ``bin/``; not resolved: a venv's python is a
    link to the base interpreter, whose folder lacks the venv's executables)."""
    return Path(sys.executable).parent


def flower_executable(name: str = "flwr") -> str:
    """The path of a Flower executable: next to the running Python first, else on PATH."""
    beside = python_bin() / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"cannot find the '{name}' executable: not next to Python ({python_bin()}) nor on "
            "PATH; install the project (bash scripts/setup.sh) or activate its venv")
    return found


def flower_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The current environment plus the offline settings (the caller's own values win, so a
    user who set HF_HUB_OFFLINE=0 keeps it), the running Python's folder first on PATH (a
    SuperLink spawns ``flwr-simulation`` and ``flower-superexec`` by name), the Flower home
    and any ``extra``."""
    env = {**OFFLINE_FLOWER_ENV, **os.environ}
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] != str(python_bin()):
        env["PATH"] = os.pathsep.join([str(python_bin()), *filter(None, [path])])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


if __name__ == "__main__":
    for key, value in OFFLINE_FLOWER_ENV.items():
        print(f'export {key}="${{{key}:-{shlex.quote(value)}}}"')
