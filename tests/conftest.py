"""Shared fixtures: tiny models built from a config, offline settings."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (scripts/test.sh: pytest -n 2): one torch thread per process, in the
    # workers and in every Flower process they start. Two OpenMP threads per process on a
    # machine already busy spin-wait for each other; a step of the tiny model then took 3 s
    # instead of 0.15 s.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

from tests.deployment import Deployment  # noqa: E402
from tests.flower_processes import LocalSimulationSuperLink  # noqa: E402
from tests.tiny_models import make_tiny_bert, make_tiny_gpt2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 64), briefly pretrained on notes from outside any federation.
    Pretraining takes ~12 s, so pytest-xdist's workers share one copy: the first builds it
    under a lock in the session's common temp folder, the others wait and reuse it."""
    shared = tmp_path_factory.getbasetemp().parent  # one folder for all workers of the session
    target = shared / "tiny-bert"
    with (shared / "tiny-bert.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            building = shared / "tiny-bert.partial"
            shutil.rmtree(building, ignore_errors=True)
            make_tiny_bert(building, pretrain=True)
            building.rename(target)
    return target


@pytest.fixture(scope="session")
def tiny_random_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-random-bert",
                          pretrain=False)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory):
    """A simulation SuperLink of the test module's own, on free ports, stopped by PID."""
    link = LocalSimulationSuperLink(tmp_path_factory.mktemp("flwr-home"))
    yield link
    link.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    """A TLS SuperLink with SuperNode authentication (deploy/ scripts), one per test module."""
    deployment = Deployment(tmp_path_factory.mktemp("deployment"))
    deployment.start_superlink()
    yield deployment
    deployment.stop()


@pytest.fixture
def hospitals(deployment):
    """The SuperNodes a test starts are stopped when it ends; the SuperLink stays."""
    yield deployment
    for name in list(deployment.supernodes):
        deployment.stop_supernode(name)


@pytest.fixture
def process_identity():
    """Flower stamps messages with the run and node of the process; tests play one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 5, 0
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None
