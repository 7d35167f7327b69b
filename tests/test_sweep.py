"""The privacy sweep end to end: ``clinical-fl -m +sweep=epsilon`` on the tiny model runs one
real ``flwr run`` per privacy level and mechanism (DP-SGD in each hospital, distributed DP over
SecAgg+), nests them under one MLflow parent run, and writes the accuracy-against-epsilon plot
and table with one series per mechanism. (A sweep's non-private level, inf, is composed in
tests/test_distributed_dp.py.)"""

from __future__ import annotations

import csv
import subprocess

import pytest

from tests.flower_processes import VENV_BIN
from tests.support import NO_DEID, mlflow_client

pytestmark = pytest.mark.e2e


def test_privacy_sweep_reports_accuracy_against_epsilon(superlink, tiny_bert, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [
        # Both series share only the target: a setting of one mechanism (distributed DP's
        # expected_batch_size) would be refused in the other's jobs
        # (clinical_fl/settings/privacy.py).
        str(VENV_BIN / "clinical-fl"), "-m", "+sweep=epsilon", "privacy=dp_sgd,distributed_dp",
        "privacy.dp_sgd.target_epsilon=8",
        f"model.name_or_path={tiny_bert}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "num_rounds=2", "data.notes_per_hospital=100", "data.server_test_notes=60",
        "model.max_length=96", "train.learning_rate=1e-2", NO_DEID, f"hydra.sweep.dir={sweep_dir}"]
    out = subprocess.run(command, env=superlink.env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]

    with (sweep_dir / "privacy_sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["mechanism"], float(r["target_epsilon"])) for r in rows] == [
        ("distributed_dp", 8.0), ("dp_sgd", 8.0)]
    assert all(0 < float(r["epsilon"]) <= 8.0 for r in rows)
    assert all(0 <= float(r["accuracy"]) <= 1 and r["status"] == "FINISHED" for r in rows)
    table = (sweep_dir / "privacy_sweep.md").read_text()
    assert "| privacy | target epsilon |" in table and "| distributed_dp | 8.00 |" in table
    assert (sweep_dir / "accuracy_vs_epsilon.png").stat().st_size > 10_000

    client = mlflow_client(tmp_path)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string="tags.kind = 'privacy-sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = client.search_runs(experiments,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert {c.info.run_id for c in children} == {r["run_id"] for r in rows}
    assert {a.path for a in client.list_artifacts(parent)} == {
        "privacy_sweep.csv", "privacy_sweep.md", "accuracy_vs_epsilon.png"}
