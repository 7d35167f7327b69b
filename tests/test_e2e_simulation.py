"""End to end: real ``flwr run`` simulations (2 hospitals, tiny model) into a real MLflow store.

The main run reads a CSV export the way a hospital network would hand one over (a site
column deals it to the hospitals, a split column holds the server's test set), with
de-identification on, and ships an adapter that is then loaded and used to classify notes.
What can be wrong before training starts is checked in-process: the same handlers and
ServerApp code, without starting processes.
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import mlflow
import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from clinical_fl.settings.compose import ConfigError, task_settings_to_yaml
from fl_app.commands import predict as predict_cli
from fl_app.server import server_app
from tasks.data.synthetic_notes import SPECIALTIES, generate_hospital_notes
from tests.hospital_process import hospital_preflight
from tests.support import history, only_run, run_overrides, task

NOTES_PER_SITE = 180  # every 6th is the server's: 150 per hospital, 120 of them for training


def _export(tmp_path, bad_label_row: int | None = None):
    """Two hospitals' notes as one CSV with site and split columns, as an export would be."""
    rows = []
    for site in (0, 1):
        for i, note in enumerate(generate_hospital_notes(site, NOTES_PER_SITE, seed=9,
                                                         label_skew_alpha=1.0,
                                                         label_noise=0.0)):
            rows.append({"note_text": note.text, "specialty": note.label,
                         "hospital": f"site-{site}",
                         "split": "test" if i % 6 == 0 else "train"})
    if bad_label_row is not None:
        rows[bad_label_row]["specialty"] = "dermatology"
    path = tmp_path / "export.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _export_settings(path) -> tuple[str, ...]:
    return ("data=files", f"data.path={path}", "data.text_column=note_text",
            "data.label_column=specialty", "data.site_column=hospital",
            "data.split_column=split")


@pytest.mark.e2e
def test_a_federated_run_on_a_csv_export_tracks_every_round_and_ships_a_working_adapter(
        superlink, tiny_bert, tmp_path):
    path = _export(tmp_path)
    overrides = run_overrides(tiny_bert, tmp_path, *_export_settings(path),
                              "model.max_length=128", "train.learning_rate=1e-2", deid=True)
    # Flower's typed run-config keys beside the overrides, as a user would write them
    status, details, output = superlink.flwr_run(
        overrides, run_config="num-server-rounds=2 local-epochs=2")
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    client, run = only_run(tmp_path)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    _check_console(output, run_id, superlink.log_file.parent.parent)
    params = run.data.params
    assert params["strategy.name"] == "fedavg" and params["num_rounds"] == "2"
    assert params["train.local_epochs"] == "2"
    assert params["data.partitioning"] == "auto", "natural: the export names its sites"
    for k in (0, 1):  # dealt by site; the split column's test rows never reach a hospital
        assert params[f"hospital_{k}.train_records"] == "120"
        assert params[f"hospital_{k}.eval_records"] == "30"
    assert run.data.tags["labels"] == ",".join(sorted(SPECIALTIES))

    for key in ("federated/accuracy", "federated/macro_f1", "federated/loss",
                "central/accuracy"):
        assert sorted(history(client, run_id, key)) == [0, 1, 2], key
    assert history(client, run_id, "central/records")[2] == 2 * NOTES_PER_SITE // 6
    for key in ("train/loss", "round/seconds", "hospital_0/accuracy", "hospital_1/train_loss"):
        assert {1, 2} <= set(history(client, run_id, key)), key
    sent = history(client, run_id, "comm/bytes_sent")
    received = history(client, run_id, "comm/bytes_received")
    assert sent[1] == sent[2] > 0 and received[1] > 0
    assert history(client, run_id, "round/train_replies")[2] == 2

    accuracy = history(client, run_id, "federated/accuracy")
    assert accuracy[2] > accuracy[0]
    assert accuracy[2] > 1 / 6 + 0.15, "well above the 6-class chance level"

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"adapter", "config", "metrics_per_round.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "config")} == {
        "config/resolved_config.yaml"}

    # The adapter, fetched by run id, loads with PEFT and classifies unseen notes.
    notes = generate_hospital_notes(777, 60, seed=3, label_skew_alpha=100.0, label_noise=0.0)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = predict_cli.main(["--run-id", run_id, "--tracking-uri",
                                 f"sqlite:///{tmp_path}/mlflow.db"]
                                + [arg for n in notes for arg in ("--text", n.text)])
    assert code == 0
    header, *lines = buffer.getvalue().splitlines()
    assert header.split("\t")[:3] == ["note", "label", "probability"]
    predicted = [line.split("\t")[1] for line in lines]
    hits = sum(p == n.label for p, n in zip(predicted, notes, strict=True))
    assert hits / len(notes) > 1 / 6 + 0.15

    # The run's MLflow Model (pyfunc) reads notes the same way, de-identification included.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    table = model.predict(pd.DataFrame({"text": [n.text for n in notes[:8]]}))
    assert table["label"].tolist() == predicted[:8]


def _check_console(output: str, run_id: str, flwr_home) -> None:
    """What the run printed: each event once, no settings dump, a line per round, the
    summary with the MLflow run id; each hospital's progress in its own log."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)
    events = [re.sub(r"^(\(ClientAppActor pid=\d+\) )?(INFO|WARNING|DEBUG|ERROR) *:\s*", "",
                     line).strip() for line in text.splitlines()]
    events = [e for e in events if e]
    repeated = {e for e in events if events.count(e) > 1}
    assert not repeated, repeated
    assert "name_or_path" not in text and "ConfigRecord" not in text, "a settings dump"
    assert not re.search(r"^\d\d/\d\d/\d{4} ", text, re.M), "a second, dated copy"
    for server_round in (0, 1, 2):
        assert f"round {server_round}/2 | " in text
    summary = text[text.rindex("MLflow run "):]
    assert run_id in summary.splitlines()[0]
    assert "--model models:/" in summary or f"--run-id {run_id}" in summary
    assert f"resume={run_id}" in summary
    for hospital in (0, 1):
        log = (flwr_home / "clinical-fl" / "hospital-state" / f"partition-{hospital}"
               / "hospital.log").read_text()
        assert "local training: done, " in log, log[-2000:]


# -- before anything starts: in-process -----------------------------------------------------


def test_an_unknown_label_in_an_export_is_counted_to_the_server_and_named_at_home(
        tiny_bert, tmp_path):
    """The server learns the refusal's code and how many records carry a label outside its
    set; the hospital's own log names the file, row, column and label. (A failed `flwr run`
    whose refusal reaches the user and MLflow: tests/test_hostile_server_run.py.)"""
    path = _export(tmp_path, bad_label_row=5)
    settings = task(tiny_bert, *_export_settings(path), labels=list(SPECIALTIES))
    # A deployed hospital reads its own export, with its own columns (the server's agree).
    own = {"data-path": str(path), "text-column": "note_text", "label-column": "specialty",
           "site-column": "hospital", "split-column": "split"}
    status = hospital_preflight(task_settings_to_yaml(settings), tmp_path / "state", 1, own)
    assert status["problem"] == "4005 labels-unknown key=data.labels records=1"
    assert f"{path}, row 7, column 'specialty': label 'dermatology' is not in" in (
        tmp_path / "state" / "hospital.log").read_text()


def test_an_empty_hospital_is_named_by_its_preflight_reply(tiny_bert, tmp_path):
    settings = task_settings_to_yaml(task(tiny_bert, "data.notes_per_hospital=0"))
    status = hospital_preflight(settings, tmp_path, 1)
    assert status["problem"] == "4006 data-too-small"
    assert "hospital 0 (partition-id=0 of 2): the partition is empty" in (
        tmp_path / "hospital.log").read_text()


def test_an_unknown_config_key_fails_before_any_store_or_hospital_is_touched(tmp_path):
    overrides = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db train.epochs=3"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"overrides": overrides})
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epochs'"):
        server_app.main(None, context)  # no Grid: nothing may reach the hospitals
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for an invalid config"
