"""A hospital's privacy accountant survives the end of its process: each round below runs in a
fresh Python process with an empty Flower context, as in a deployment where a new ClientApp
process serves each message or the SuperNode restarts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fl_app.run_settings import task_settings_to_yaml
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.task_settings import (
    DataSettings,
    DpSgdSettings,
    ModelSettings,
    TaskSettings,
    TrainSettings,
)
from tests.flower_processes import ROOT
from tests.test_privacy_accounting import independent_epsilon


def _round_in_new_process(settings_file, state_dir, server_round, run_id=42):
    out = subprocess.run([sys.executable, "-m", "tests.hospital_process", str(settings_file),
                          str(state_dir), str(run_id), str(server_round)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_epsilon_keeps_composing_across_process_restarts(tiny_bert, tmp_path):
    settings = TaskSettings(model=ModelSettings(name_or_path=str(tiny_bert), max_length=64),
                            data=DataSettings(notes_per_hospital=40, labels=list(SPECIALTIES)),
                            train=TrainSettings(batch_size=8), planned_rounds=3)
    settings.privacy.dp_sgd = DpSgdSettings(enabled=True, target_epsilon=4.0, max_epsilon=4.0)
    settings_file = tmp_path / "task.yaml"
    settings_file.write_text(task_settings_to_yaml(settings))
    state = tmp_path / "hospital-state"

    first = _round_in_new_process(settings_file, state, 1)
    second = _round_in_new_process(settings_file, state, 2)
    assert second["dp-steps"] == 2 * first["dp-steps"]
    history = [(first["noise-multiplier"], first["sample-rate"], second["dp-steps"])]
    assert second["epsilon"] == pytest.approx(independent_epsilon(history, second["delta"]),
                                              rel=1e-6)
    assert second["epsilon"] > first["epsilon"]

    # Without the state directory, the second round would have claimed one round's epsilon.
    forgetful = _round_in_new_process(settings_file, tmp_path / "elsewhere", 2)
    assert forgetful["epsilon"] == pytest.approx(first["epsilon"])

    third = _round_in_new_process(settings_file, state, 3)
    assert third["epsilon"] <= 4.0 and third["can-train-next"] == 0
    refused = _round_in_new_process(settings_file, state, 4)
    assert "privacy budget: round 4 would raise epsilon" in refused["error"]
    ledger = json.loads((state / "privacy-ledger.json").read_text())
    assert [run["rounds_trained"] for run in ledger["runs"]] == [[1, 2, 3]]
