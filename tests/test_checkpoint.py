"""The server's checkpoint file, the strategy state it carries, and every way ``resume=`` can
be wrong: each fails before any round, naming the run, the file or the keys."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from clinical_fl.protocol import messages as m
from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, to_run_settings
from fl_app.server.resume import config_tree, prepare_resume
from strategies.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    ServerCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from strategies.registry import build_strategy
from strategies.round_offset import AfterRound
from strategies.strategy_state import restore_strategy_state, strategy_state
from tests.support import TwoNodeGrid

ARRAYS = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3),
          "head.weight": np.ones((4, 2), np.float32)}


def _checkpoint(run_id="run-1", round_=2, config=None, overrides=()):
    return ServerCheckpoint(
        mlflow_run_id=run_id, round=round_, num_rounds=4, ledger_run=77,
        overrides=list(overrides), config=config or {}, task_yaml="seed: 1\n",
        arrays=ARRAYS, strategy_arrays={"m_t/lora_A": np.full((2, 3), 0.5, np.float32)},
        strategy_state={"client_level_accountant": {"compositions": []}},
        excluded={3: "hospital 3 cannot afford another round"}, rejections={1: 2},
        metrics={"round/seconds": 1.5}, history={1: {"round/seconds": 1.0}})


def test_a_checkpoint_reads_back_as_written_and_leaves_no_temporary_file(tmp_path):
    path = save_checkpoint(_checkpoint(), tmp_path / "run-1")
    save_checkpoint(_checkpoint(round_=3), tmp_path / "run-1")  # replaced, not appended
    assert sorted(p.name for p in path.parent.iterdir()) == [CHECKPOINT_FILE]
    loaded = load_checkpoint(path)
    assert loaded.round == 3 and loaded.ledger_run == 77
    assert loaded.excluded == {3: "hospital 3 cannot afford another round"}
    assert loaded.rejections == {1: 2} and loaded.history == {1: {"round/seconds": 1.0}}
    assert list(loaded.arrays) == list(ARRAYS)  # order kept: FedAvgM's momentum is a list
    for key, value in ARRAYS.items():
        np.testing.assert_array_equal(loaded.arrays[key], value)
        assert loaded.arrays[key].dtype == np.float32
    np.testing.assert_array_equal(loaded.strategy_arrays["m_t/lora_A"], 0.5)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], r"unreadable \(corrupted or truncated\)"),
    (lambda b: b[:200] + bytes(len(b) - 200), r"unreadable \(corrupted or truncated\)"),
    (lambda b: b"not a checkpoint", r"unreadable \(corrupted or truncated\)"),
])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage, message):
    path = save_checkpoint(_checkpoint(), tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_checkpoint_of_another_format_or_without_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", meta=np.array('{"format": 9}'))
    with pytest.raises(CheckpointError, match="has format 9; this version reads format 1"):
        load_checkpoint(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "absent.npz")


def _train_reply(node: int, arrays: dict[str, np.ndarray]) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                      message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                               "metrics": MetricRecord({m.WEIGHT_KEY: 1.0})}), reply_to=request)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm"])
def test_a_restored_strategy_steps_exactly_as_the_uninterrupted_one(strategy,
                                                                    process_identity):
    """Three rounds of a real Flower strategy, against two rounds, a checkpoint into a new
    strategy, and the third round: the same global adapter."""
    def rules(records, key):
        return MetricRecord()

    settings = to_run_settings(compose_config([f"strategy={strategy}"])).strategy

    def round_(strategy_, server_round, arrays, flower_round=None):
        """The hospitals' reply depends on the run's round; Flower's loop may count its own."""
        flower_round = flower_round or server_round
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        list(strategy_.configure_train(flower_round, record, ConfigRecord(), TwoNodeGrid()))
        update = {k: v + 0.1 * server_round * (i + 1) for i, (k, v) in enumerate(arrays.items())}
        new, _ = strategy_.aggregate_train(flower_round, [_train_reply(1, update)])
        return {k: v.numpy() for k, v in new.items()}

    whole = build_strategy(settings, rules, rules)
    arrays = dict(ARRAYS)
    for server_round in (1, 2, 3):
        arrays = round_(whole, server_round, arrays)

    first = build_strategy(settings, rules, rules)
    resumed_arrays = dict(ARRAYS)
    for server_round in (1, 2):
        resumed_arrays = round_(first, server_round, resumed_arrays)
    saved, state = strategy_state(first)
    assert saved, "a stateful strategy's state was not found"
    second = build_strategy(settings, rules, rules)
    restore_strategy_state(second, saved, state)
    resumed_arrays = round_(AfterRound(second, 2), 3, resumed_arrays, flower_round=1)
    for key in ARRAYS:
        np.testing.assert_allclose(resumed_arrays[key], arrays[key], rtol=1e-6)

    forgetful = build_strategy(settings, rules, rules)  # what resuming without the state gives
    before = round_(build_strategy(settings, rules, rules), 1, dict(ARRAYS))
    other = round_(AfterRound(forgetful, 2), 3, before, flower_round=1)
    assert not np.allclose(other["lora_A"], arrays["lora_A"])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating one takes seconds); a run per test."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("clinical-fl", artifact_location=(root / "artifacts").as_uri())
    return root


def _store(root):
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name(
            "clinical-fl").experiment_id) as run:
        pass
    return [f"tracking.uri={uri}"], run.info.run_id


def _resume_settings(overrides, run_id, *more):
    return to_run_settings(compose_config([*overrides, *more, f"resume={run_id}"]))


def _write(tmp_path, run_id, overrides, round_=2):
    config = config_tree(compose_config(overrides))
    return save_checkpoint(_checkpoint(run_id, round_, config, overrides),
                           tmp_path / "server-state" / run_id)


def test_resume_continues_with_the_first_runs_configuration_and_allowed_changes(store):
    overrides, run_id = _store(store)
    first = [*overrides, "train.local_epochs=2", "strategy=fedprox"]
    _write(store, run_id, first)
    given = [*overrides, "num_rounds=6", f"resume={run_id}"]
    resume = prepare_resume(_resume_settings(overrides, run_id, "num_rounds=6"), given, store)
    assert resume.cfg.train.local_epochs == 2 and resume.cfg.strategy.name.value == "fedprox"
    assert resume.cfg.num_rounds == 6 and resume.changes == {"num_rounds": ("4", "6")}
    assert resume.overrides == [*first, *overrides, "num_rounds=6"]


def test_resume_refuses_more_rounds_under_a_cosine_lr_schedule(store):
    """The schedule's factors are planned over num_rounds: more rounds would raise the rates
    of the rounds still to come."""
    overrides, run_id = _store(store)
    first = [*overrides, "train.lr_schedule=cosine"]
    _write(store, run_id, first)
    given = [*overrides, "num_rounds=6", f"resume={run_id}"]
    with pytest.raises(ConfigError, match="num_rounds may not change with train.lr_schedule"):
        prepare_resume(_resume_settings(overrides, run_id, "num_rounds=6"), given, store)
    same = prepare_resume(_resume_settings(overrides, run_id), [*overrides, f"resume={run_id}"],
                          store)
    assert same.cfg.train.lr_schedule.value == "cosine" and same.changes == {}


def test_resume_refuses_an_unknown_run(store):
    overrides, _ = _store(store)
    with pytest.raises(CheckpointError, match="resume=nope: no MLflow run with this id in "
                                              "sqlite:///"):
        prepare_resume(_resume_settings(overrides, "nope"), [], store)


def test_resume_refuses_a_run_without_a_checkpoint(store):
    overrides, run_id = _store(store)
    with pytest.raises(CheckpointError, match=f"resume={run_id}: no checkpoint at .*"
                                              "server-state/.* and none logged to MLflow"):
        prepare_resume(_resume_settings(overrides, run_id), [], store)


def test_resume_refuses_a_corrupted_checkpoint_and_points_at_the_mlflow_copy(store):
    overrides, run_id = _store(store)
    path = _write(store, run_id, overrides)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable .* MLflow artifact checkpoint/"
                                              "checkpoint.npz holds a copy"):
        prepare_resume(_resume_settings(overrides, run_id), [], store)


def test_without_its_state_directory_a_run_resumes_from_the_mlflow_artifact(store):
    overrides, run_id = _store(store)
    path = _write(store, run_id, overrides)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(str(path), "checkpoint")
    path.unlink()
    resume = prepare_resume(_resume_settings(overrides, run_id), [], store)
    assert resume.checkpoint.round == 2 and resume.checkpoint.mlflow_run_id == run_id


def test_resume_refuses_a_changed_configuration_naming_each_key(store):
    overrides, run_id = _store(store)
    _write(store, run_id, overrides)
    given = [*overrides, "train.learning_rate=0.5", "strategy=fedyogi"]
    with pytest.raises(ConfigError) as err:
        prepare_resume(_resume_settings(overrides, run_id), given, store)
    assert "train.learning_rate: " in str(err.value) and "-> 0.5" in str(err.value)
    assert "strategy.name: fedavg -> fedyogi" in str(err.value)


def test_resume_refuses_a_run_that_completed_its_rounds(store):
    overrides, run_id = _store(store)
    _write(store, run_id, overrides, round_=4)
    with pytest.raises(ConfigError, match="completed round 4 of num_rounds=4; nothing to "
                                          "resume .*num_rounds above 4"):
        prepare_resume(_resume_settings(overrides, run_id), [], store)
