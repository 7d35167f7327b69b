"""Early stopping (issue 31): a non-private run stops when the federated validation macro-F1
stops improving and keeps its best round's adapter; never in a private run.

The settings through the product's compose function; the mechanism through
``server_app.train_federation`` and Flower's own loop, with a planted validation curve (no
hospitals: each round's aggregate is an adapter whose values are the round number), the real
checkpointer writing real checkpoints, and a resume from one; one real ``flwr run`` of the
tiny model that stops after round 2 of 3 and ships round 1's adapter.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import Strategy

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, to_run_settings
from clinical_fl.settings.early_stopping import EarlyStoppingSettings
from fl_app.server.early_stopping import EarlyStopped, EarlyStopping
from fl_app.server.resume import MAY_CHANGE, config_tree, prepare_resume
from fl_app.server.round_checkpointer import RoundCheckpointer
from fl_app.server.server_app import train_federation
from strategies.checkpoint import (
    CHECKPOINT_FILE,
    ServerCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from strategies.privacy_budget import TrainingStopped
from tests.support import history, only_run, run_overrides

METRIC = "federated/macro_f1"


def settings_of(*overrides: str):
    return to_run_settings(compose_config(list(overrides)))


# -- settings ---------------------------------------------------------------------------------

def test_early_stopping_is_on_by_default_in_a_non_private_run():
    settings = settings_of()
    assert settings.early_stopping == EarlyStoppingSettings(
        enabled=True, patience=2, min_delta=0.0, metric=METRIC)
    # resolved when the settings are built: what MLflow logs is what the run does
    assert compose_config([]).early_stopping.enabled is True
    assert settings_of("early_stopping.enabled=false").early_stopping.enabled is False


@pytest.mark.parametrize("overrides", [
    ["privacy=dp_sgd"], ["privacy=distributed_dp", "secure_aggregation=secagg_plus"],
    ["privacy=central_dp"], ["privacy=dp_sgd_central_dp"],
    # a privacy sweep's non-private level trains every round, as the levels it is compared with
    ["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf"],
], ids=["dp_sgd", "distributed_dp", "central_dp", "dp_sgd_central_dp", "sweep_inf_level"])
def test_early_stopping_resolves_off_in_a_private_run(overrides):
    settings = settings_of(*overrides)
    assert settings.early_stopping.enabled is False
    assert EarlyStopping.for_run(settings) is None  # the last round's adapter, as before


@pytest.mark.parametrize("privacy,switch", [
    ("dp_sgd", "privacy.mechanism=dp_sgd"), ("central_dp", "privacy.central_dp.enabled=true"),
    ("distributed_dp", "privacy.mechanism=distributed_dp")])
def test_early_stopping_enabled_in_a_private_run_is_refused_naming_the_key(privacy, switch):
    extra = ["secure_aggregation=secagg_plus"] if privacy == "distributed_dp" else []
    with pytest.raises(ConfigError) as err:
        compose_config([f"privacy={privacy}", *extra, "early_stopping.enabled=true"])
    assert err.value.key == "early_stopping.enabled"
    assert f"false or null with {switch}: the noise is calibrated for num_rounds=" \
        in str(err.value)


@pytest.mark.parametrize("overrides,key,message", [
    (["early_stopping.enabled=false", "early_stopping.patience=3"], "early_stopping.patience",
     "while early_stopping.enabled=false: this setting takes effect only with "
     "early_stopping.enabled=true"),
    (["early_stopping.enabled=false", "early_stopping.min_delta=0.01"],
     "early_stopping.min_delta", "takes effect only with early_stopping.enabled=true"),
    (["early_stopping.enabled=false", "early_stopping.metric=federated/accuracy"],
     "early_stopping.metric", "takes effect only with early_stopping.enabled=true"),
    (["privacy=dp_sgd", "early_stopping.patience=3"], "early_stopping.patience",
     "got 3 while early stopping is off for privacy.mechanism=dp_sgd"),
    (["privacy=central_dp", "early_stopping.min_delta=0.1"], "early_stopping.min_delta",
     "off for privacy.central_dp.enabled=true"),
    (["privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=inf", "early_stopping.patience=3"],
     "early_stopping.patience", "a privacy sweep's non-private level"),
], ids=["patience-off", "min_delta-off", "metric-off", "patience-dp_sgd", "min_delta-central",
        "patience-sweep"])
def test_early_stopping_settings_of_a_switched_off_mechanism_are_refused(overrides, key,
                                                                         message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert err.value.key == key and message in str(err.value), str(err.value)


@pytest.mark.parametrize("override,key,expected", [
    ("early_stopping.patience=0", "early_stopping.patience", "an integer from 1 to 10,000"),
    ("early_stopping.min_delta=-0.1", "early_stopping.min_delta", "at least 0 and finite"),
    ("early_stopping.min_delta=nan", "early_stopping.min_delta", "at least 0 and finite"),
    ("early_stopping.min_delta=inf", "early_stopping.min_delta", "at least 0 and finite"),
    ("early_stopping.metric=central/macro_f1", "early_stopping.metric",
     "central/* is the server's test set"),
    ("early_stopping.metric=federated/loss", "early_stopping.metric",
     "one of ['federated/macro_f1', 'federated/accuracy']"),
])
def test_early_stopping_values_are_checked(override, key, expected):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert err.value.key == key and expected in str(err.value), str(err.value)
    with pytest.raises(ConfigError):  # built by hand too
        EarlyStoppingSettings(patience=True)


# -- the mechanism, round by round ----------------------------------------------------------

def _arrays(server_round: int) -> ArrayRecord:
    return ArrayRecord({"lora_A": Array(np.full((2, 3), server_round, np.float32)),
                        "head.weight": Array(np.full(4, -server_round, np.float32))})


def _stopping(num_rounds: int = 8, **settings) -> EarlyStopping:
    return EarlyStopping(EarlyStoppingSettings(enabled=True, **settings), num_rounds)


def _feed(stopping: EarlyStopping, curve: dict[int, float | None]) -> int | None:
    """Rounds in order; the round after which the run stops (None: it does not)."""
    for server_round, value in curve.items():
        stopping.observe(server_round, _arrays(server_round),
                         {} if value is None else {METRIC: value, "round/seconds": 1.0})
        if stopping.reason:
            return server_round
    return None


def test_early_stopping_stops_after_patience_evaluations_without_improvement():
    stopping = _stopping(patience=2)
    # round 0 (the untrained adapter) is never a candidate, however it scores
    stopped = _feed(stopping, {0: 0.99, 1: 0.50, 2: 0.70, 3: 0.69, 4: 0.70, 5: 0.95})
    assert stopped == 4 and stopping.best.round == 2 and stopping.best.value == 0.70
    assert stopping.reason == ("early stopping: federated/macro_f1 did not improve by more "
                               "than 0.0 for 2 evaluations; best round 2 (0.700), stopped "
                               "after round 4 of 8")
    np.testing.assert_array_equal(stopping.final_arrays(_arrays(4))["lora_A"].numpy(), 2)


def test_early_stopping_counts_only_improvements_above_min_delta_and_only_evaluated_rounds():
    stopping = _stopping(patience=2, min_delta=0.05)
    # +0.04 is no improvement; rounds not evaluated (evaluate_every) and a withheld NaN
    # neither count nor reset the count
    assert _feed(stopping, {1: 0.50, 2: 0.54, 3: None, 4: math.nan, 5: 0.53}) == 5
    assert stopping.best.round == 1 and stopping.stale == 2
    stopping = _stopping(patience=2, min_delta=0.05)
    assert _feed(stopping, {1: 0.50, 2: 0.54, 3: 0.56}) is None  # +0.06 over the best
    assert stopping.best.round == 3 and stopping.stale == 0


def test_early_stopping_never_stops_the_last_round_and_keeps_the_best_adapter():
    stopping = _stopping(num_rounds=3, patience=2)
    assert _feed(stopping, {0: 0.1, 1: 0.5, 2: 0.5, 3: 0.4}) is None
    assert stopping.best.round == 1 and stopping.stale == 2
    no_scores = _stopping(num_rounds=3)
    assert _feed(no_scores, {0: 0.1, 1: None, 2: None, 3: None}) is None
    assert no_scores.final_arrays(_arrays(3)) is not None and no_scores.best is None


def test_early_stopped_is_a_training_stopped_the_server_app_already_ends_on():
    assert issubclass(EarlyStopped, TrainingStopped)


# -- through train_federation and Flower's loop ----------------------------------------------

class PlantedStrategy(Strategy):
    """Flower's strategy interface over no hospitals: round k's aggregate is ``_arrays(k)``."""

    def __init__(self) -> None:
        self.trained: list[int] = []

    def summary(self) -> None:
        pass

    def configure_train(self, server_round, arrays, config, grid):
        self.trained.append(server_round)
        return []

    def aggregate_train(self, server_round, replies):
        return _arrays(server_round), None

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None


class NoHospitals:  # the Grid calls Flower's loop makes
    def send_and_receive(self, messages, timeout=None):
        return []


class Tracker:  # the RunTracker calls the checkpointer and train_federation make
    def __init__(self) -> None:
        self.history: dict[int, dict[str, float]] = {}
        self.tags: dict[str, str] = {}

    def set_tags(self, tags) -> None:
        self.tags.update(tags)

    def log_round(self, server_round, metrics) -> None:
        self.history.setdefault(server_round, {}).update(metrics)

    def log_artifact(self, path, artifact_path) -> None:
        pass


def _federation(tmp_path, settings, curve, checkpoint=None):
    """train_federation over the planted curve, as the ServerApp wires it: the checkpointer
    shows each round to early stopping before writing the checkpoint."""
    tracker, strategy = Tracker(), PlantedStrategy()
    template = ServerCheckpoint(mlflow_run_id="run-1", round=0, num_rounds=settings.num_rounds,
                                ledger_run=1, overrides=[], config={}, task_yaml="", arrays={})
    checkpointer = RoundCheckpointer(tmp_path, tracker, template, strategy,
                                     SimpleNamespace(exhausted={}),
                                     SimpleNamespace(rejected_total={}), lambda n: n, False)
    stopping = EarlyStopping.for_run(settings, checkpoint)
    checkpointer.early_stopping = stopping
    done = checkpoint.round if checkpoint else 0
    latest = [_arrays(done)]  # RoundEnd.latest_arrays

    def planted_round(server_round: int, arrays: ArrayRecord):  # RoundEnd + RoundConsole
        latest[0] = arrays
        value = curve.get(server_round)
        metrics = {"round/seconds": 1.0, **({METRIC: value} if value is not None else {})}
        checkpointer(server_round, arrays, metrics)
        tracker.log_round(server_round, metrics)
        return None

    train_federation(strategy, NoHospitals(), _arrays(done), settings, ConfigRecord(),
                     planted_round, tracker, done=done, early_stopping=stopping)
    final = stopping.final_arrays(latest[0]) if stopping else latest[0]  # as main() saves
    return strategy, tracker, final, load_checkpoint(tmp_path / CHECKPOINT_FILE)


CURVE = {0: 0.1, 1: 0.50, 2: 0.70, 3: 0.69, 4: 0.70, 5: 0.69, 6: 0.75, 7: 0.8, 8: 0.85}


def test_early_stopping_ends_flowers_loop_tags_mlflow_and_checkpoints_the_best(tmp_path):
    settings = settings_of("num_rounds=8")
    strategy, tracker, final, checkpoint = _federation(tmp_path, settings, CURVE)
    assert strategy.trained == [1, 2, 3, 4], "no round after the one that stopped the run"
    assert sorted(tracker.history) == [0, 1, 2, 3, 4]
    assert tracker.tags == {
        "stopped_early": "early stopping: federated/macro_f1 did not improve by more than 0.0 "
                         "for 2 evaluations; best round 2 (0.700), stopped after round 4 of 8",
        "best_round": "2"}
    assert tracker.history[2]["best/federated/macro_f1"] == 0.70
    np.testing.assert_array_equal(final["lora_A"].numpy(), 2)  # the saved adapter's
    # the checkpoint of the last round carries the best round, its adapter and the count
    assert checkpoint.round == 4
    assert checkpoint.early_stopping == {"metric": METRIC, "stale": 2, "best_round": 2,
                                         "best_value": 0.70}
    np.testing.assert_array_equal(checkpoint.best_arrays["lora_A"], 2)
    np.testing.assert_array_equal(checkpoint.arrays["lora_A"], 4)


def test_early_stopping_off_trains_every_round_and_keeps_the_last_adapter(tmp_path):
    settings = settings_of("num_rounds=8", "early_stopping.enabled=false")
    strategy, tracker, final, checkpoint = _federation(tmp_path, settings, CURVE)
    assert strategy.trained == list(range(1, 9)) and not tracker.tags
    np.testing.assert_array_equal(final["lora_A"].numpy(), 8)
    assert checkpoint.early_stopping == {} and checkpoint.best_arrays == {}


def test_early_stopping_resumes_with_the_checkpoints_best_round_and_count(tmp_path):
    first = settings_of("num_rounds=8")
    *_, checkpoint = _federation(tmp_path / "first", first, CURVE)  # stopped after round 4
    # resumed with more patience: round 5 is a third evaluation without improvement
    resumed = settings_of("num_rounds=8", "early_stopping.patience=3")
    strategy, tracker, final, after = _federation(tmp_path / "resumed", resumed, CURVE,
                                                  checkpoint)
    assert strategy.trained == [5], "the run's own round numbers, one round"
    assert "best round 2 (0.700), stopped after round 5 of 8" in tracker.tags["stopped_early"]
    np.testing.assert_array_equal(final["lora_A"].numpy(), 2)  # from the checkpoint
    assert after.early_stopping["stale"] == 3 and after.early_stopping["best_round"] == 2
    # with still more patience, round 6 improves: the best moves on and is checkpointed
    more = settings_of("num_rounds=8", "early_stopping.patience=5")
    strategy, tracker, final, after = _federation(tmp_path / "more", more, CURVE, checkpoint)
    assert strategy.trained == [5, 6, 7, 8] and "stopped_early" not in tracker.tags
    assert tracker.tags["best_round"] == "8"
    np.testing.assert_array_equal(final["lora_A"].numpy(), 8)
    assert after.best_arrays == {}, "the best is the checkpoint's own adapter: not twice"


def test_early_stopping_restarts_from_a_checkpoint_without_its_state(tmp_path):
    """A checkpoint written before early stopping existed (or with it off, or following
    another metric): the tracking starts at the resumed round."""
    old = ServerCheckpoint(mlflow_run_id="run-1", round=4, num_rounds=8, ledger_run=1,
                           overrides=[], config={}, task_yaml="",
                           arrays={k: v.numpy() for k, v in _arrays(4).items()})
    path = save_checkpoint(old, tmp_path / "old")
    meta = dict(np.load(path, allow_pickle=False))
    assert "early_stopping" in str(meta["meta"])
    # a file of the earlier writer: no early-stopping keys in its JSON, no best arrays
    stripped = json.loads(str(meta["meta"]))
    del stripped["early_stopping"]
    meta["meta"] = np.array(json.dumps(stripped))
    with open(path, "wb") as out:
        np.savez(out, **meta)
    loaded = load_checkpoint(path)
    assert loaded.early_stopping == {} and loaded.best_arrays == {}
    stopping = EarlyStopping.for_run(settings_of("num_rounds=8"), loaded)
    assert stopping.best is None and stopping.stale == 0
    other_metric = ServerCheckpoint(**{**old.__dict__, "early_stopping": {
        "metric": "federated/accuracy", "stale": 1, "best_round": 4, "best_value": 0.9}})
    stopping = EarlyStopping.for_run(settings_of("num_rounds=8"), other_metric)
    assert stopping.best is None
    same = ServerCheckpoint(**{**old.__dict__, "early_stopping": {
        "metric": METRIC, "stale": 0, "best_round": 4, "best_value": 0.9}})
    stopping = EarlyStopping.for_run(settings_of("num_rounds=8"), same)
    assert stopping.best.round == 4  # its adapter is the checkpoint's own
    np.testing.assert_array_equal(stopping.best.arrays["lora_A"].numpy(), 4)


def test_early_stopping_settings_may_change_on_resume(tmp_path):
    """Resuming may change early stopping (when the run stops, which adapter it keeps; never
    on in a private run), and a run checkpointed before the section existed resumes."""
    assert "early_stopping" in MAY_CHANGE
    root = tmp_path / "store"
    root.mkdir()
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("clinical-fl",
                                          artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    run_id, overrides = run.info.run_id, [f"tracking.uri={uri}"]
    config = config_tree(compose_config(overrides))
    del config["early_stopping"]  # a run from before early stopping
    save_checkpoint(ServerCheckpoint(
        mlflow_run_id=run_id, round=2, num_rounds=4, ledger_run=1, overrides=overrides,
        config=config, task_yaml="", arrays={"a": np.zeros(2, np.float32)}),
        root / "server-state" / run_id)
    given = [*overrides, "early_stopping.patience=5", f"resume={run_id}"]
    resume = prepare_resume(to_run_settings(compose_config(given)), given, root)
    assert resume.changes["early_stopping.patience"] == ("<absent>", "5")
    assert resume.cfg.early_stopping.patience == 5


# -- one real run ------------------------------------------------------------------------------

@pytest.mark.e2e
def test_early_stopping_in_a_real_run_stops_after_round_2_of_3_and_ships_round_1(
        superlink, tiny_bert, tmp_path):
    """min_delta 1.0: no macro-F1 can improve by more than that, so round 1 stays the best
    and, with patience 1, round 2 stops the run: deterministic whatever the scores."""
    status, details, output = superlink.flwr_run(run_overrides(
        tiny_bert, tmp_path, "num_rounds=3", "data.notes_per_hospital=40",
        "data.server_test_notes=20", "train.learning_rate=1e-2",
        "early_stopping.patience=1", "early_stopping.min_delta=1.0"))
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"
    client, run = only_run(tmp_path)
    run_id, tags = run.info.run_id, run.data.tags
    assert run.info.status == "FINISHED"
    assert sorted(history(client, run_id, "round/seconds")) == [0, 1, 2], "round 3 not run"
    f1 = history(client, run_id, METRIC)
    assert tags["stopped_early"] == (
        f"early stopping: federated/macro_f1 did not improve by more than 1.0 for 1 "
        f"evaluation; best round 1 ({f1[1]:.3f}), stopped after round 2 of 3")
    assert tags["best_round"] == "1"
    assert history(client, run_id, "best/federated/macro_f1") == {1: f1[1]}
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)
    assert "training stopped early: early stopping: federated/macro_f1" in text
    assert "stopped early: early stopping" in text[text.rindex("MLflow run "):]  # summary

    # The adapter shipped is round 1's (the checkpoint after round 2 keeps it), not round 2's.
    checkpoint = load_checkpoint(next((tmp_path / "server-state").glob(f"*/{CHECKPOINT_FILE}")))
    assert checkpoint.round == 2 and checkpoint.early_stopping["best_round"] == 1
    from tasks.model.build import load_adapter

    adapter = client.download_artifacts(run_id, "adapter", str(tmp_path / "downloaded"))
    model, *_ = load_adapter(adapter)
    shipped = model.state_dict()
    assert checkpoint.best_arrays.keys() <= shipped.keys()
    for key, value in checkpoint.best_arrays.items():
        np.testing.assert_allclose(shipped[key].numpy(), value, err_msg=key)
    assert any(not np.allclose(shipped[key].numpy(), value)
               for key, value in checkpoint.arrays.items()), "round 2's adapter was shipped"
