"""End to end: a real ``flwr run`` simulation (2 hospitals, 2 rounds, tiny model) into a real
MLflow store, then the adapter artifact is loaded and used to classify notes."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
from mlflow.tracking import MlflowClient

from fl_app import predict_cli
from tasks.data.synthetic_notes import generate_hospital_notes

pytestmark = pytest.mark.e2e


def _overrides(tiny_bert, store, extra=""):
    return (f"model.name_or_path={tiny_bert} tracking.uri=sqlite:///{store}/mlflow.db "
            "num_rounds=2 data.notes_per_hospital=150 data.server_test_notes=100 "
            "model.max_length=128 model.lora.dropout=0.0 train.learning_rate=1e-2 "
            f"train.local_epochs=2 {extra}")


def _history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_federated_run_tracks_every_round_and_ships_a_working_adapter(superlink, tiny_bert,
                                                                      tmp_path):
    status, details, output = superlink.flwr_run(_overrides(tiny_bert, tmp_path))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedavg"
    assert run.data.params["num_rounds"] == "2"

    for key in ("federated/accuracy", "federated/macro_f1", "federated/loss",
                "central/accuracy"):
        assert sorted(_history(client, run.info.run_id, key)) == [0, 1, 2], key
    for key in ("train/loss", "round/seconds", "hospital_0/accuracy", "hospital_1/train_loss"):
        assert {1, 2} <= set(_history(client, run.info.run_id, key)), key
    sent = _history(client, run.info.run_id, "comm/bytes_sent")
    received = _history(client, run.info.run_id, "comm/bytes_received")
    assert sent[1] == sent[2] > 0 and received[1] > 0
    assert _history(client, run.info.run_id, "round/train_replies")[2] == 2

    accuracy = _history(client, run.info.run_id, "federated/accuracy")
    assert accuracy[2] > accuracy[0]
    assert accuracy[2] > 1 / 6 + 0.15, "well above the 6-class chance level"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config", "metrics_per_round.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {
        "config/resolved_config.yaml"}

    # The adapter, fetched by run id, loads with PEFT and classifies unseen notes.
    notes = generate_hospital_notes(777, 60, seed=3, label_skew_alpha=100.0, label_noise=0.0)
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = predict_cli.main(["--run-id", run.info.run_id, "--tracking-uri", uri]
                                + [arg for n in notes for arg in ("--text", n.text)])
    assert code == 0
    predicted = [line.split("\t")[1] for line in buffer.getvalue().splitlines()]
    hits = sum(p == n.label for p, n in zip(predicted, notes, strict=True))
    assert hits / len(notes) > 1 / 6 + 0.15


def test_empty_hospital_stops_the_run_before_training_and_mlflow_says_why(superlink, tiny_bert,
                                                                          tmp_path):
    status, details, output = superlink.flwr_run(
        _overrides(tiny_bert, tmp_path, "data.notes_per_hospital=0"))
    assert status == "finished:failed"
    assert "hospital 0 (partition-id=0 of 2): the partition is empty" in output
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "partition is empty" in runs[0].data.tags["failure"]
    assert not client.get_metric_history(runs[0].info.run_id, "train/loss"), "nothing trained"


def test_unknown_config_key_fails_before_anything_starts(superlink, tiny_bert, tmp_path):
    status, _, output = superlink.flwr_run(_overrides(tiny_bert, tmp_path, "train.epochs=3"))
    assert status == "finished:failed"
    assert "unknown key 'train.epochs'" in output
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow run for an invalid config"


def _export(tmp_path, bad_label_row: int | None = None):
    """Two hospitals' notes as one CSV with site and split columns, as an export would be."""
    import pandas as pd

    rows = []
    for site in (0, 1):
        for i, note in enumerate(generate_hospital_notes(site, 120, seed=9,
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


def _file_overrides(tiny_bert, tmp_path, path, labels: str | None = None):
    overrides = (f"model.name_or_path={tiny_bert} tracking.uri=sqlite:///{tmp_path}/mlflow.db "
                 "num_rounds=2 model.max_length=128 model.lora.dropout=0.0 "
                 "train.learning_rate=1e-2 train.local_epochs=2 "
                 f"data=files data.path={path} data.text_column=note_text "
                 "data.label_column=specialty data.site_column=hospital "
                 "data.partitioning=natural data.split_column=split")
    if labels:
        overrides += f" data.labels=[{labels}]"
    return overrides


def test_run_on_a_csv_export_partitions_by_site_and_scores_the_test_split(superlink, tiny_bert,
                                                                          tmp_path):
    path = _export(tmp_path)
    status, details, output = superlink.flwr_run(_file_overrides(tiny_bert, tmp_path, path))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    params = run.data.params
    # 120 notes per site, every 6th held back for the server: 100 per hospital.
    for k in (0, 1):
        assert params[f"hospital_{k}.train_records"] == "80"
        assert params[f"hospital_{k}.eval_records"] == "20"
    assert sorted(_history(client, run.info.run_id, "central/accuracy")) == [0, 1, 2]
    assert _history(client, run.info.run_id, "central/records")[2] == 40
    assert run.data.tags["labels"] == ",".join(sorted({n.label for s in (0, 1) for n in
                                                       generate_hospital_notes(
                                                           s, 120, 9, 1.0, 0.0)}))


def test_an_unknown_label_in_an_export_stops_the_run_naming_file_row_and_column(
        superlink, tiny_bert, tmp_path):
    path = _export(tmp_path, bad_label_row=5)
    labels = "cardiology,pulmonology,gastroenterology,neurology,endocrinology,orthopedics"
    status, details, output = superlink.flwr_run(
        _file_overrides(tiny_bert, tmp_path, path, labels))
    assert status == "finished:failed"
    assert f"{path}, row 7, column 'specialty': label 'dermatology' is not in" in output
