"""Start and stop real Flower processes for tests: by PID, on 127.0.0.1, in a temporary home."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fl_app.commands.flower_env import flower_env

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def simulation_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    return flower_env(flwr_home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
                      FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
                      PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


class LocalSimulationSuperLink:
    """The same simulation SuperLink ``flwr run`` would spawn, but started here so that we
    own its PID; ``flwr run`` finds it by port and uses it."""

    def __init__(self, flwr_home: Path) -> None:
        self.http_port, self.control_port = free_port(), free_port()
        self.env = simulation_env(flwr_home, self.http_port, self.control_port)
        state = flwr_home / "local-superlink"
        state.mkdir(parents=True, exist_ok=True)
        self.log_file = state / "superlink.log"
        self.process = subprocess.Popen(
            ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
             "--control-api-address", f"127.0.0.1:{self.control_port}", "--host", "127.0.0.1",
             "--port", str(self.http_port), "--database", str(state / "state.db"),
             "--log-file", str(self.log_file)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its own process group: we stop it and its children
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: {self.log_file.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("flower-superlink did not become healthy within 60 s")

    def flwr_run(self, overrides: str, timeout: float = 600,
                 hospitals: int | None = None, run_config: str = "") -> tuple[str, str, str]:
        """Run the app (with ``hospitals`` simulated SuperNodes, else Flower's default;
        ``run_config``: typed run-config keys beside the overrides, ``k=v ...``); returns
        (status, details, output)."""
        from fl_app.commands.flower_runs import run_status, started_run_id

        out = subprocess.run(
            flwr_run_command(overrides, hospitals, run_config),
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        output = out.stdout + out.stderr
        run_id = started_run_id(output)
        assert run_id, output[-3000:]
        status, details = run_status(run_id, env=self.env)
        return status, details, output

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        else:
            # The SuperLink is gone, but a simulation it spawned may linger in the group.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def flwr_run_command(overrides: str, hospitals: int | None = None,
                     run_config: str = "") -> list[str]:
    command = ["flwr", "run", str(ROOT), "--stream", "--run-config",
               f"{run_config} overrides='{overrides}'".strip()]
    return command + (["--federation-config", f"num-supernodes={hospitals}"] if hospitals else [])


def start_flwr_run(superlink: LocalSimulationSuperLink, overrides: str) -> subprocess.Popen:
    """``flwr run`` in the background (its own process group), streaming into a pipe."""
    return subprocess.Popen(
        flwr_run_command(overrides), env=superlink.env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(*processes: subprocess.Popen) -> None:
    """SIGKILL these processes and everything they spawned (Ray's processes and a
    ServerApp's leave the process group, not the tree): a machine going down."""
    import psutil

    doomed = []
    for process in processes:
        try:
            doomed += [process.pid, *(c.pid for c in psutil.Process(process.pid).children(
                recursive=True))]
        except psutil.NoSuchProcess:
            pass
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        process.wait(timeout=30)


def crash(superlink: LocalSimulationSuperLink, *others: subprocess.Popen) -> None:
    """The simulation's server side goes down: the SuperLink, its ServerApp, ``others``."""
    kill_tree(superlink.process, *others)
