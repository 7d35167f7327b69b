"""What a run prints: one line per round, the final summary, training progress, quiet
third-party logging, and the local SuperLink a run leaves behind found by its PID.

The whole output of a real simulation is checked in tests/test_e2e_simulation.py."""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path

import pytest
from flwr.common.logger import FLOWER_LOGGER

from fl_app import console
from fl_app.commands import local_superlink
from fl_app.server.run_summary import EXAMPLE_NOTE, FinishedRun, executable, summary
from tasks.learning.progress import TrainingProgress

HISTORY = {
    0: {"federated/accuracy": 0.3, "federated/macro_f1": 0.17, "central/accuracy": 0.135,
        "central/macro_f1": 0.08, "round/seconds": 24.0},
    1: {"round/train_replies": 2, "round/error_replies": 1, "train/loss": 1.145,
        "federated/accuracy": 0.775, "federated/macro_f1": float("nan"),
        "central/accuracy": 0.613, "central/macro_f1": 0.556, "round/seconds": 12.4,
        "privacy/epsilon_max": 2.345},
    2: {"round/train_replies": 2, "round/seconds": 11.0},  # not evaluated this round
}


def test_a_round_is_one_line_with_what_was_measured_and_nothing_withheld():
    line = console.round_line(1, 4, HISTORY[1])
    assert line == ("round 1/4 | 12 s | 2 hospitals trained, 1 error reply | train loss 1.145 "
                    "| federated accuracy 0.775 | central accuracy 0.613 macro-F1 0.556 "
                    "| epsilon 2.35")
    assert "\n" not in line and "nan" not in line.lower()
    assert console.round_line(0, 4, HISTORY[0]).startswith("round 0/4 | 24 s | federated")
    assert console.round_line(2, 4, HISTORY[2]) == "round 2/4 | 11 s | 2 hospitals trained"


def _finished(**changes) -> FinishedRun:
    run = dict(run_id="abc123", run_name="fedavg-r4", experiment="clinical-fl",
               tracking_uri="sqlite:////x/mlruns/mlflow.db", num_rounds=4, history=HISTORY,
               adapter_logged=True)
    return FinishedRun(**{**run, **changes})


def test_the_summary_names_the_mlflow_run_the_scores_and_the_next_commands():
    text = summary(_finished(registered_model="models:/clinical-fl@current"), Path("/x"))
    first, *rest = text.splitlines()
    assert first == "MLflow run fedavg-r4 (abc123), experiment clinical-fl"
    # the last round that measured (round 2 was not evaluated); a withheld (NaN) macro-F1
    # is left out, never taken from another round
    assert "federated  accuracy 0.775 (round 1" in text
    assert "central    accuracy 0.613, macro-F1 0.556 (round 1" in text
    assert "runs:/abc123/adapter, registered as models:/clinical-fl@current" in text
    assert "ui --backend-store-uri sqlite:////x/mlruns/mlflow.db --port 5000" in text
    assert "--model models:/clinical-fl@current --text" in text
    assert "resume=abc123 num_rounds=8" in text
    assert len(rest) < 12


def test_the_summary_without_an_adapter_offers_no_prediction():
    text = summary(_finished(adapter_logged=False, stopped_early="budget spent",
                             history={}), Path("/x"))
    assert "stopped early: budget spent" in text
    assert "federated  not measured" in text
    assert "predict" not in text and "serve" not in text and "resume=abc123" in text


def test_commands_are_the_executables_next_to_this_python():
    root = Path(sys.executable).parent.parent.parent
    assert executable("clinical-fl", root) == str(
        (Path(sys.executable).parent / "clinical-fl").relative_to(root))
    assert Path(executable("clinical-fl", Path("/elsewhere"))).is_absolute()


def test_the_example_note_is_one_line_of_the_synthetic_notes_vocabulary():
    assert "\n" not in EXAMPLE_NOTE and "chest pain" in EXAMPLE_NOTE.lower()


def test_training_progress_says_epoch_steps_and_seconds(caplog):
    with caplog.at_level(logging.INFO, logger="tasks"):
        progress = TrainingProgress(2, 3, every_s=0.0)  # a line at every step
        for epoch in range(2):
            for _ in range(3):
                progress.step(epoch)
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "local training: 2 epoch(s) of 3 steps (6 steps)"
    assert lines[4].startswith("local training: epoch 2/2, step 4/6, ")
    assert lines[-1].startswith("local training: done, 6/6 steps in ")


def test_training_progress_is_quiet_between_its_intervals(caplog):
    with caplog.at_level(logging.INFO, logger="tasks"):
        progress = TrainingProgress(1, 100, every_s=3600)
        for _ in range(100):
            progress.step(0)
        progress.finish()
    assert len(caplog.records) == 2  # the start and the end


def test_third_party_noise_is_stopped_at_its_source(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(FLOWER_LOGGER, "propagate", True)
    monkeypatch.setattr(logging.getLogger("mlflow"), "level", logging.NOTSET)
    opacus_like = logging.StreamHandler()
    opacus_like.setFormatter(logging.Formatter("%(asctime)s:%(levelname)s:%(message)s"))
    root.addHandler(opacus_like)  # what Opacus' basicConfig installs when imported first
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_third_party()
        console.quiet_third_party()  # idempotent
        warnings.warn("Tip: In future versions of Ray, Ray will ...", FutureWarning,
                      stacklevel=1)
        warnings.warn("a warning nobody filtered", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning nobody filtered"]
    assert opacus_like not in root.handlers
    assert sum(getattr(h, "_clinical_fl", False) for h in root.handlers) == 1
    assert not FLOWER_LOGGER.propagate  # Flower's lines are printed once, by its handler
    assert logging.getLogger("mlflow").getEffectiveLevel() == logging.WARNING


def test_the_strategy_narration_is_left_out_but_not_its_warnings():
    narration = console._NotStrategyNarration()

    def record(level: int, path: str) -> logging.LogRecord:
        return logging.LogRecord("flwr", level, path, 1, "msg", None, None)

    strategy = str(Path("site-packages/flwr/serverapp/strategy/strategy.py"))
    assert not narration.filter(record(logging.INFO, strategy))
    assert narration.filter(record(logging.WARNING, strategy))
    assert narration.filter(record(logging.INFO, str(Path("flwr/simulation/app.py"))))


@pytest.mark.e2e
def test_the_local_superlink_is_found_by_its_pid_under_its_own_flwr_home(superlink):
    home = superlink.log_file.parent.parent
    assert local_superlink.superlink_pids(home) == [superlink.process.pid]
    assert local_superlink.superlink_pids(home / "another-home") == []


def test_not_a_number_is_never_a_score():
    assert console._score({"federated/accuracy": math.nan}, "federated") is None


def test_the_summary_reports_the_round_whose_adapter_the_run_ships():
    history = {1: {"federated/accuracy": 0.8, "federated/macro_f1": 0.7},
               2: {"federated/accuracy": 0.7, "federated/macro_f1": 0.6}}
    text = summary(_finished(history=history, best_round=1), Path("/x"))
    assert "federated  accuracy 0.800, macro-F1 0.700 (round 1" in text
    assert "runs:/abc123/adapter (round 1, the best)" in text
