"""The environment every Flower process of this product runs in: offline, quiet, no telemetry.

The one place it is written. ``clinical-fl`` and ``clinical-fl-audit`` add it to the
``flwr run`` they start, the tests to every process they start, and
``scripts/env.sh`` exports it for the shell (``python -m fl_app.flower_env``).
"""

from __future__ import annotations

import os
import shlex
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


def flower_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The current environment plus the offline settings (the caller's own values win, so a
    user who set HF_HUB_OFFLINE=0 keeps it), the Flower home and any ``extra``."""
    env = {**OFFLINE_FLOWER_ENV, **os.environ}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


if __name__ == "__main__":
    for key, value in OFFLINE_FLOWER_ENV.items():
        print(f'export {key}="${{{key}:-{shlex.quote(value)}}}"')
