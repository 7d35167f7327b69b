"""A real Flower deployment on 127.0.0.1 for tests, built with the operator scripts in deploy/:
a SuperLink, SuperNodes (one per hospital, each on its own data file), the CLI connection.
Every process is started here and stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fl_app.commands.flower_env import flower_env
from tasks.data.synthetic_notes import generate_hospital_notes
from tests.flower_processes import ROOT, VENV_BIN, free_port, kill_tree
from tests.support import wait_until

DEPLOY = ROOT / "deploy"


def _env(flwr_home: Path) -> dict[str, str]:
    return flower_env(flwr_home, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _script(name: str, *args: str, env: dict[str, str]) -> str:
    out = subprocess.run(["bash", str(DEPLOY / name), *args], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, f"{name} {args}: {out.stdout}{out.stderr}"
    return out.stdout


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    try:  # children it left behind (a ClientApp or ServerApp process)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Deployment:
    """Coordinator side: certificates, the SuperLink, registered keys, the CLI connection, and
    the hospitals' SecAgg+ roster (deploy/roster.sh over every key ``hospital_key`` made)."""

    root: Path
    secure: bool = True
    connection: str = "test-deploy"
    processes: list[subprocess.Popen] = field(default_factory=list)
    supernodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    roster_keys: tuple[Path, ...] = ()  # the public keys the roster file holds

    def __post_init__(self) -> None:
        self.certs, self.keys = self.root / "certs", self.root / "keys"
        self.roster = self.root / "roster.pub"
        self.home = self.root / "coordinator-home"
        self.env = {**_env(self.home), "HOSPITAL_REGISTRY": str(self.root / "hospitals.tsv")}
        self.port = free_port()
        if self.secure:
            _script("certs.sh", str(self.certs), env=self.env)

    def start_superlink(self) -> None:
        log = (self.root / "superlink.log").open("w")
        args = [str(self.certs)] if self.secure else ["--insecure"]
        process = subprocess.Popen(
            ["bash", str(DEPLOY / "superlink.sh"), str(self.root / "superlink-state"), *args,
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        _script("connection.sh", self.connection, f"127.0.0.1:{self.port}",
                str(self.certs / "ca.crt") if self.secure else "--insecure", env=self.env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # ready when the CLI can list SuperNodes
            assert process.poll() is None, (self.root / "superlink.log").read_text()[-3000:]
            if self.flwr("supernode", "list", self.connection).returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError("SuperLink not ready: " + (self.root / "superlink.log").read_text())

    def crash_superlink(self) -> None:
        """SIGKILL the SuperLink and the ServerApp it runs (the coordinator's machine fails);
        its database stays, as a disk would."""
        kill_tree(*self.processes)
        self.processes.clear()

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False, cwd=ROOT)

    def hospital_key(self, name: str, register: bool = True) -> Path:
        _script("hospital-key.sh", str(self.keys), name, env=self.env)
        if register:
            _script("register.sh", str(self.keys / f"{name}.pub"), self.connection, env=self.env)
        return self.keys / name

    def make_roster(self, *also: Path) -> Path:
        """The roster of every hospital key made so far (and of the private keys ``also``,
        by their .pub beside them), (re)written when a key was added. A SuperNode reads the
        file at each SecAgg+ stage, so the ones already running see the hospitals that joined
        after them (deploy/roster.sh replaces the file whole)."""
        keys = tuple(sorted({*self.roster_keys, *self.keys.glob("*.pub"),
                             *(key.with_name(f"{key.name}.pub") for key in also)}))
        if keys != self.roster_keys:
            _script("roster.sh", "--force", str(self.roster), *map(str, keys), env=self.env)
            self.roster_keys = keys
        return self.roster

    def start_supernode(self, name: str, number: int, data: Path, secure: bool | None = None,
                        key: Path | None = None, policy: dict[str, str] | None = None,
                        ckks_context: Path | None = None) -> subprocess.Popen:
        """``policy``: the hospital's privacy policy flags, e.g. {"max-epsilon": "3"};
        ``ckks_context``: the hospitals' CKKS key (deploy/ckks-keys.sh)."""
        secure = self.secure if secure is None else secure
        state = self.root / "hospitals" / name
        state.mkdir(parents=True, exist_ok=True)
        key_file = key or self.keys / name
        security = (["--ca", str(self.certs / "ca.crt"), "--key", str(key_file),
                     "--roster", str(self.make_roster(key_file))] if secure else ["--insecure"])
        log = (state / "supernode.log").open("a")
        process = subprocess.Popen(
            ["bash", str(DEPLOY / "supernode.sh"), "--hospital", name, "--number", str(number),
             "--data-path", str(data), "--state-dir", str(state), "--superlink",
             f"127.0.0.1:{self.port}", "--port", str(free_port()), *security,
             # De-identification is required by default; the tests switch it off for speed.
             *[arg for key, value in ({"deid": "allowed"} | (policy or {})).items()
               for arg in (f"--{key}", value)],
             *(["--ckks-context", str(ckks_context)] if ckks_context else [])],
            env={**self.env, "FLWR_HOME": str(state / "flwr-home")}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.supernodes[name] = process
        return process

    def ckks_keys(self) -> Path:
        """The hospitals' CKKS key material, made once by the operator script."""
        directory = self.root / "ckks"
        if not (directory / "ckks-secret.ctx").exists():
            _script("ckks-keys.sh", str(directory), env=self.env)
        return directory / "ckks-secret.ctx"

    def supernode_log(self, name: str) -> str:
        return (self.root / "hospitals" / name / "supernode.log").read_text()

    def connected_nodes(self) -> int:
        out = self.flwr("supernode", "list", self.connection, "--format", "json")
        return out.stdout.count('"online"')

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected_nodes() >= count:
                return
            time.sleep(3)  # each look is a `flwr` CLI process: CPU the run needs
        raise RuntimeError(f"only {self.connected_nodes()} SuperNodes online after {timeout} s")

    def run(self, overrides: str, timeout: float = 900) -> subprocess.Popen:
        """Start ``flwr run`` against this deployment (returns the running process)."""
        return subprocess.Popen(
            ["flwr", "run", str(ROOT), self.connection, "--stream", "--run-config",
             f"overrides='{overrides}'"], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)

    def finish(self, process: subprocess.Popen, timeout: float = 900) -> tuple[str, str, str]:
        from fl_app.commands.flower_runs import run_status, started_run_id

        output, _ = process.communicate(timeout=timeout)
        run_id = started_run_id(output)
        assert run_id, output[-3000:]
        status, details = run_status(run_id, self.connection, self.env)
        return status, details, output

    def stop_supernode(self, name: str, sig: int = signal.SIGTERM) -> None:
        _stop(self.supernodes.pop(name), sig)

    def stop(self) -> None:
        for name in list(self.supernodes):
            self.stop_supernode(name)
        for process in self.processes:
            _stop(process)


def hospital_file(directory, hospital: int, notes: int = 90):
    """A hospital's own export: CSV with its notes (its own style and case mix)."""
    rows = [{"text": n.text, "label": n.label}
            for n in generate_hospital_notes(hospital, notes, seed=21, label_skew_alpha=1.0,
                                             label_noise=0.0)]
    path = directory / f"hospital-{hospital}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def wait_for_log(deployment, name: str, text: str, run, times: int = 1,
                  timeout: float = 900):
    def seen() -> bool:
        if run.poll() is not None:
            output, _ = run.communicate()
            raise AssertionError(f"the run ended before {name} logged '{text}':\n"
                                 f"{output[-3000:]}")
        return deployment.supernode_log(name).count(text) >= times

    wait_until(seen, timeout, f"{name} logs '{text}' {times} time(s)")
