"""MLflow as its users expect, in-process on a temporary SQLite store: a run is named by its
settings, tagged with its git commit and Flower run, logs only the settings that take effect,
lists its data as dataset inputs (counts, never text), logs a model with an input example and
installable requirements, registers it with the alias on the latest finished run's version,
and every sweep gets a parent run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

import mlflow
import pandas as pd
import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import instantiate
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clinical_fl.serving.pyfunc import INPUT_EXAMPLE, installable, log_note_model
from clinical_fl.settings.compose import CONF_DIR, ConfigError, compose_config, to_run_settings
from clinical_fl.settings.data import DataSettings, DataSource, DeidSettings
from clinical_fl.settings.model import ModelSettings
from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.datasets import server_test_dataset
from clinical_fl.tracking.params import run_params
from clinical_fl.tracking.provenance import FlowerRun
from clinical_fl.tracking.run_names import default_run_name
from clinical_fl.tracking.run_tracker import RunTracker
from fl_app.commands import sweep as sweep_module
from fl_app.commands.cli import sweep_jobs
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.model.build import build_model, save_adapter

LABELS = list(SPECIALTIES)
FLOWER = FlowerRun(run_id=4242, fab_id="clinical-fl/clinical-fl-lora", fab_version="1.0.0",
                   fab_hash="ab" * 32)


@dataclass
class Report:  # fl_app/server/preflight.py::HospitalReport, the fields the datasets read
    hospital: int
    node_id: int
    train_records: int
    eval_records: int
    label_counts: list[int] = field(default_factory=list)
    empty_texts_dropped: int = 0
    declined: str = ""


def settings_of(*overrides: str):
    return to_run_settings(compose_config(list(overrides)))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (a new one takes seconds to create its tables); each
    test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def tracking(store: str, experiment: str, **changes) -> TrackingSettings:
    # System metrics off unless a test asks for them.
    return replace(TrackingSettings(uri=store, experiment=experiment,
                                    system_metrics_interval_s=None), **changes)


def git_checkout(root):
    root.mkdir()
    (root / "file.txt").write_text("one\n")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for args in (["init", "-q"], ["add", "file.txt"], ["commit", "-q", "-m", "one"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_a_run_without_a_name_is_named_by_its_settings():
    assert default_run_name(settings_of("privacy=dp_sgd")) == "fedavg-dp_sgd-eps8-r4"
    assert default_run_name(settings_of()) == "fedavg-nodp-r4"
    assert default_run_name(settings_of("privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=null",
                                        "privacy.dp_sgd.noise_multiplier=1.1", "num_rounds=2")
                            ) == "fedavg-dp_sgd-noise1.1-r2"
    assert default_run_name(settings_of("privacy=distributed_dp")) == \
        "fedadam-distributed_dp-eps8-secagg_plus-r60"
    assert default_run_name(settings_of("privacy=dp_sgd_central_dp")) == \
        "fedavg-dp_sgd-eps8-central_dp-noise1-r4"


@pytest.mark.parametrize("override", ["tracking.model_alias=latest", "tracking.model_alias=v3",
                                      "tracking.registered_model=a/b",
                                      "tracking.system_metrics_interval_s=0.5"])
def test_a_registry_name_or_alias_mlflow_would_refuse_fails_before_the_run(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        compose_config([override])


def test_a_run_is_tagged_named_and_logs_what_takes_effect(store, tmp_path):
    root = tmp_path / "checkout"
    commit = git_checkout(root)
    settings = settings_of("privacy=dp_sgd", "num_rounds=2")
    settings.tracking = tracking(store, "tags", system_metrics_interval_s=1)
    config = {"privacy": {"mechanism": "dp_sgd",
                          "dp_sgd": {"target_epsilon": 8.0, "target_delta": None},
                          "distributed_dp": {"target_epsilon": 8.0},
                          "central_dp": {"enabled": False, "noise_multiplier": 1.0}},
              "strategy": {"name": "fedavg", "proximal_mu": 0.1, "fraction_train": 1.0},
              "secure_aggregation": {"mode": "none", "clipping_range": 4.0},
              "update_checks": {"max_update_norm": None}, "resume": None}
    reports = [Report(0, 11, 240, 60, [40] * len(LABELS)), Report(1, 12, 200, 50),
               Report(2, 13, 100, 25, declined="policy-refused")]
    with RunTracker(settings.tracking, root, run_settings=settings, flower=FLOWER) as tracker:
        tracker.log_config(config, "whole: config\n")
        tracker.log_run_datasets(reports, LABELS, settings.data)
        time.sleep(1.3)  # one sample of system metrics at the 1 s interval
    assert tracker.summary.status == "FINISHED" and tracker.summary.run_name == \
        "fedavg-dp_sgd-eps8-r2" and tracker.summary.registered_model is None  # no model

    client = MlflowClient(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "fedavg-dp_sgd-eps8-r2"
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["git_dirty"] == "false"
    assert tags["flwr.run_id"] == "4242" and tags["flwr.fab_hash"] == "ab" * 32
    assert tags["flwr.app"] == "@clinical-fl/clinical-fl-lora==1.0.0"
    assert run.data.params == {"privacy.mechanism": "dp_sgd",
                               "privacy.dp_sgd.target_epsilon": "8.0",
                               "strategy.name": "fedavg", "strategy.fraction_train": "1.0",
                               "update_checks.max_update_norm": "none"}
    assert client.download_artifacts(tracker.run_id, "config/resolved_config.yaml", tmp_path)

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"hospital_0", "hospital_1", "server_test_set"}  # 2 declined
    context = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
               for name, d in inputs.items()}
    assert context == {"hospital_0": "training", "hospital_1": "training",
                       "server_test_set": "evaluation"}
    profile = json.loads(inputs["hospital_0"].dataset.profile)
    assert profile["train_records"] == 240 and profile["eval_records"] == 60
    assert profile["train_label_counts"] == dict.fromkeys(LABELS, 40)
    assert "train_label_counts" not in json.loads(inputs["hospital_1"].dataset.profile)
    assert json.loads(inputs["server_test_set"].dataset.profile) == {"records": 400}
    assert all(len(d.dataset.digest) == 8 for d in inputs.values())
    assert json.loads(inputs["hospital_1"].dataset.source)["node_id"] == 12
    everything = json.dumps([d.dataset.to_dictionary() for d in inputs.values()])
    assert "CC:" not in everything and "text\": \"" not in everything  # counts, never notes

    metrics = client.get_run(tracker.run_id).data.metrics
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)


def test_without_git_there_is_no_commit_tag_and_no_error(store, tmp_path):
    (tmp_path / "plain").mkdir()
    with RunTracker(tracking(store, "no-git", run_name="given"), tmp_path / "plain",
                    flower=FlowerRun(run_id=7)) as tracker:
        pass
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert run.info.run_name == "given" and run.data.tags["flwr.run_id"] == "7"
    assert "git_dirty" not in run.data.tags and "flwr.fab_hash" not in run.data.tags
    assert run.data.tags.get("mlflow.source.git.commit") is None

    # Resumed by another Flower run from a git checkout: the first Flower run's id stays, the
    # tags it lacked are added.
    commit = git_checkout(tmp_path / "checkout")
    with RunTracker(tracking(store, "no-git"), tmp_path / "checkout", tracker.run_id,
                    flower=FlowerRun(run_id=8)) as resumed:
        pass
    run = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id)
    assert resumed.summary.run_name == "given" and run.info.status == "FINISHED"
    assert run.data.tags["flwr.run_id"] == "7"
    assert run.data.tags["mlflow.source.git.commit"] == commit


def test_the_params_of_a_switched_off_section_are_not_logged():
    params = run_params(compose_and_resolve())
    assert "privacy.distributed_dp.target_epsilon" not in params
    assert not any(k.startswith(("privacy.", "secure_aggregation.", "audit.", "drill."))
                   for k in params), sorted(params)
    assert "strategy.proximal_mu" not in params and "data.path" not in params
    assert "None" not in params.values() and params["data.deid.enabled"] == "True"
    off = run_params(compose_and_resolve("data.deid.enabled=false", "strategy=fedprox"))
    assert off["data.deid.enabled"] == "False" and "data.deid.score_threshold" not in off
    assert off["strategy.proximal_mu"] == "0.1"


def test_a_test_set_read_from_files_is_fingerprinted_by_its_rows():
    data = DataSettings(source=DataSource.files, path="export.csv", split_column="split")
    rows = (["note a", "note b"], ["cardiology", "neurology"])
    dataset = server_test_dataset(data, LABELS, lambda: rows)
    assert dataset.profile == {"records": 2} and dataset.source.to_dict() == {
        "site": "server", "data": "files", "path": "export.csv"}
    other = server_test_dataset(data, LABELS, lambda: (["note a", "note c"], rows[1]))
    assert other.digest != dataset.digest
    assert server_test_dataset(replace(data, split_column=None), LABELS, lambda: rows) is None


def compose_and_resolve(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True,
                                  enum_to_str=True)


@pytest.fixture(scope="module")
def adapter(tiny_random_bert, tmp_path_factory):
    """A tiny adapter without de-identification (Presidio's start-up is not tested here)."""
    settings = ModelSettings(name_or_path=str(tiny_random_bert), max_length=64)
    model = build_model(settings, LABELS, seed=0)
    return save_adapter(model, tmp_path_factory.mktemp("adapter"), settings, LABELS,
                        DeidSettings(enabled=False))


def test_importing_the_model_class_raises_no_type_hint_warning():
    """MLflow warns when a PythonModel without a type hint on predict is defined (on import);
    a fresh interpreter, since the class is defined once per process."""
    done = subprocess.run([sys.executable, "-W", "always", "-c",
                           "import clinical_fl.serving.pyfunc"],
                          cwd=CONF_DIR.parent, capture_output=True, text=True, check=True)
    assert "Add type hints" not in done.stderr, done.stderr


def test_the_model_is_registered_and_the_alias_follows_finished_runs_only(adapter, store,
                                                                          tmp_path):
    settings = tracking(store, "registry")
    with RunTracker(settings, tmp_path) as first:
        first.model_logged(log_note_model(adapter, LABELS))
    summary = first.summary
    assert (summary.registered_model, summary.model_version, summary.model_alias) == (
        "clinical-fl-note-classifier", "1", "current")
    assert summary.model_uri == "models:/clinical-fl-note-classifier@current"
    client = MlflowClient(first.tracking_uri)
    tags = client.get_run(first.run_id).data.tags
    assert tags["registered_model"] == "models:/clinical-fl-note-classifier/1"
    assert (tags["registered_model.name"], tags["registered_model.version"],
            tags["registered_model.alias"]) == ("clinical-fl-note-classifier", "1", "current")

    with pytest.raises(RuntimeError, match="round 3"), RunTracker(settings, tmp_path) as failed:
        failed.model_logged(log_note_model(adapter, LABELS))
        raise RuntimeError("round 3 crashed")
    assert failed.summary.status == "FAILED" and failed.summary.registered_model is None
    version = client.get_model_version_by_alias("clinical-fl-note-classifier", "current")
    assert version.run_id == first.run_id and str(version.version) == "1"
    assert len(client.search_model_versions("name='clinical-fl-note-classifier'")) == 1
    with RunTracker(settings, tmp_path) as second:
        second.model_logged(log_note_model(adapter, LABELS))
    version = client.get_model_version_by_alias("clinical-fl-note-classifier", "current")
    assert version.run_id == second.run_id and second.summary.model_version == "2"

    # The logged model: an input example, installable requirements, the documented calls.
    local = mlflow.artifacts.download_artifacts(f"runs:/{first.run_id}/model",
                                                dst_path=str(tmp_path / "model"))
    requirements = (tmp_path / "model" / "model" / "requirements.txt").read_text()
    assert "torch==" in requirements and "+" not in requirements, requirements
    assert (tmp_path / "model" / "model" / "input_example.json").is_file(), local
    assert installable("2.13.0+cpu") == "2.13.0"
    model = mlflow.pyfunc.load_model(summary.model_uri)
    assert model.metadata.get_input_schema().input_names() == ["text"]
    # The call clinical_fl/serving/pyfunc.py documents; the input example is one note.
    table = model.predict(pd.DataFrame({"text": ["CC: chest pain on exertion ...", "Rash."]}))
    assert list(table.columns[:2]) == ["label", "probability"] and len(table) == 2
    assert set(table["label"]) <= set(LABELS) and len(model.predict(INPUT_EXAMPLE)) == 1
    with pytest.raises(MlflowException, match="missing inputs"):
        model.predict(["CC: chest pain on exertion ..."])  # not a documented call


def compose_multirun(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return GlobalHydra.instance().hydra.compose_config(
            "config", overrides, run_mode=RunMode.MULTIRUN)


def run_sweep(overrides: list[str]) -> None:
    """What ``clinical-fl -m`` does with its callbacks, without flwr: every callback opens,
    each job's run is tracked as the ServerApp tracks it, then the callbacks close."""
    config = compose_multirun(overrides)
    callbacks = [instantiate(c) for c in config.hydra.callbacks.values()]
    for callback in callbacks:
        callback.on_multirun_start(config)
    parent, name = (os.environ[sweep_module.PARENT_RUN_ENV],
                    os.environ[sweep_module.SWEEP_NAME_ENV])
    for job in sweep_jobs(overrides):
        job = [o for o in job if not o.startswith("hydra.")]
        job += [f"tracking.parent_run_id={parent}", f"tracking.sweep={name}",
                "tracking.system_metrics_interval_s=null"]
        settings = settings_of(*job)
        with RunTracker(settings.tracking, CONF_DIR, run_settings=settings, overrides=job):
            pass
    for callback in reversed(callbacks):  # as Hydra ends them
        callback.on_multirun_end(config)


def test_every_sweep_gets_a_parent_run_and_its_jobs_say_what_they_vary(store, tmp_path):
    where = [f"tracking.uri={store}", "tracking.experiment=sweeps"]
    run_sweep(["strategy=fedavg,fedprox", "train.learning_rate=0.01,0.02", *where,
               f"hydra.sweep.dir={tmp_path}/sweep"])
    client = MlflowClient(store)
    experiments = [client.get_experiment_by_name("sweeps").experiment_id]
    [parent] = client.search_runs(experiments, "tags.kind = 'sweep'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.varies"] == "strategy,train.learning_rate"
    children = client.search_runs(experiments,
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == [
        "fedavg-nodp-r4-learning_rate-0.01", "fedavg-nodp-r4-learning_rate-0.02",
        "fedprox-nodp-r4-learning_rate-0.01", "fedprox-nodp-r4-learning_rate-0.02"]
    assert not client.list_artifacts(parent.info.run_id)  # no privacy report
    assert not (tmp_path / "sweep" / "privacy_sweep.csv").exists()

    # +sweep=epsilon: its report callback joins the one parent run (kind privacy-sweep).
    run_sweep(["+sweep=epsilon", "privacy.dp_sgd.target_epsilon=8", *where,
               f"hydra.sweep.dir={tmp_path}/eps"])
    parents = client.search_runs(experiments, "tags.kind = 'privacy-sweep'")
    assert len(parents) == 1 and parents[0].data.tags["sweep.varies"] == ""
    assert (tmp_path / "eps" / "privacy_sweep.csv").is_file()
    assert not sweep_module._OPEN
