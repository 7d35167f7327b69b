"""The local SuperLink that ``flwr run`` starts for a simulation, and stopping it by its PID.

``flwr run`` starts a detached ``flower-superlink`` on first use and leaves it running (with a
defunct ``flwr-simulation`` child it never reaps). Whoever started a run and found no
SuperLink running stops the one the run started, so a run leaves no process behind:

    python -m fl_app.commands.local_superlink running   # exit 0 when one answers on 127.0.0.1
    python -m fl_app.commands.local_superlink stop      # the one under this FLWR_HOME, by its PID

The process is found by its command line, which names the log file under ``$FLWR_HOME``, so
another user's or another checkout's SuperLink is never touched.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
from flwr.cli.constant import LOCAL_SUPERLINK_HTTP_API_PORT
from flwr.supercore.utils import get_flwr_home


def running() -> bool:
    """Whether a local SuperLink answers its health check."""
    # httpx logs every request at INFO, which a CLI with logging configured would print
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return httpx.get(f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health",
                         timeout=2).is_success
    except httpx.HTTPError:
        return False


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of ``flower-superlink`` processes logging under ``flwr_home`` (Linux /proc)."""
    log_file = str(flwr_home / "local-superlink" / "superlink.log")
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        words = [a.decode(errors="replace") for a in argv]
        if any(w.endswith("flower-superlink") for w in words) and log_file in words:
            pids.append(int(entry.name))
    return pids


def stop(flwr_home: Path, wait_s: float = 10.0) -> list[int]:
    """Stop the local SuperLink(s) under ``flwr_home``: SIGTERM, then SIGKILL after
    ``wait_s``. Returns the PIDs stopped."""
    pids = superlink_pids(flwr_home)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    return pids


def main(argv: list[str]) -> int:
    if argv == ["running"]:
        return 0 if running() else 1
    if argv == ["stop"]:
        home = get_flwr_home()
        if not Path("/proc").is_dir():
            print(f"the local SuperLink keeps running; stop it with: kill <PID of the "
                  f"flower-superlink logging to {home}/local-superlink/superlink.log>")
            return 0
        pids = stop(home)
        if pids:
            print(f"stopped the local SuperLink this run started (PID {', '.join(map(str, pids))})")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
