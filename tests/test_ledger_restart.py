"""A hospital's privacy accountant survives the end of its process: round 2 below runs in a
fresh Python process, the others in this one with an empty Flower context each, as in a
deployment where a new ClientApp process serves each message or the SuperNode restarts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clinical_fl.settings.compose import task_settings_to_yaml
from tests.flower_processes import ROOT
from tests.hospital_process import hospital_train
from tests.support import independent_epsilon, task


def _round_in_new_process(settings_file, state_dir, server_round, run_id=42):
    out = subprocess.run([sys.executable, "-m", "tests.hospital_process", str(settings_file),
                          str(state_dir), str(run_id), str(server_round)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_epsilon_keeps_composing_across_process_restarts(tiny_bert, tmp_path):
    settings = task(tiny_bert, "data.notes_per_hospital=40", "train.batch_size=8",
                    "privacy=dp_sgd", "train.local_epochs=1", "privacy.dp_sgd.target_epsilon=4",
                    "privacy.dp_sgd.max_epsilon=4", planned_rounds=3)
    settings_yaml = task_settings_to_yaml(settings)
    settings_file = tmp_path / "task.yaml"
    settings_file.write_text(settings_yaml)
    state = tmp_path / "hospital-state"

    first = hospital_train(settings_yaml, state, 42, 1)
    second = _round_in_new_process(settings_file, state, 2)
    assert second["dp-steps"] == 2 * first["dp-steps"]
    history = [(first["noise-multiplier"], first["sample-rate"], second["dp-steps"])]
    assert second["epsilon"] == pytest.approx(independent_epsilon(history, second["delta"]),
                                              rel=1e-6)
    assert second["epsilon"] > first["epsilon"]

    # Without the state directory, the second round would have claimed one round's epsilon.
    forgetful = hospital_train(settings_yaml, tmp_path / "elsewhere", 42, 2)
    assert forgetful["epsilon"] == pytest.approx(first["epsilon"])

    third = hospital_train(settings_yaml, state, 42, 3)
    assert third["epsilon"] <= 4.0 and third["can-train-next"] == 0
    refused = hospital_train(settings_yaml, state, 42, 4)
    assert refused["code"] == 4031  # the server learns the code; the hospital's log, why
    assert "privacy budget: round 4 would raise epsilon" in (state / "hospital.log").read_text()
    ledger = json.loads((state / "privacy-ledger.json").read_text())
    assert [run["rounds_trained"] for run in ledger["runs"]] == [[1, 2, 3]]
