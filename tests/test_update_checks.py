"""Train replies are checked before aggregation: a NaN, an Inf, a missing key or a wrong shape
is left out and its hospital named; the others' aggregate is FedAvg over them alone."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy import FedAvg

from clinical_fl.protocol import messages as m
from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, task_settings_to_yaml
from clinical_fl.settings.recovery import Fault, UpdateCheckSettings
from fl_app.hospital.fault_drill import broken, fault_drill_mod
from strategies.checkpoint import CHECKPOINT_FILE, load_checkpoint
from strategies.update_check import UpdateCheck, update_problem
from tasks.errors import TaskInputError
from tests.flower_processes import LocalSimulationSuperLink
from tests.hospital_process import hospital_train_reply, initial_arrays
from tests.support import only_run, run_overrides, task

GLOBAL = {"a": np.zeros((3, 2), np.float32), "b": np.ones(4, np.float32)}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


@pytest.mark.parametrize("fault, expected", [
    (Fault.nan, "a: NaN values"), (Fault.inf, "a: Inf values"),
    (Fault.missing_key, "keys differ from the global adapter: missing ['a']"),
    (Fault.wrong_shape, "a: shape (2, 2), expected (3, 2)"),
    (Fault.float64, "a: dtype float64, expected float32"),
    (Fault.huge, "update L2 norm 3.24e+06 above update_checks.max_update_norm 1000"),
])
def test_each_fault_of_the_drill_is_named(fault, expected):
    reply = broken(_record({k: v + 0.5 for k, v in GLOBAL.items()}), fault)
    assert update_problem(reply, GLOBAL, 1000.0) == expected


def test_a_sound_update_passes_and_an_extra_key_does_not():
    assert update_problem(_record({"a": GLOBAL["a"] + 3, "b": GLOBAL["b"]}), GLOBAL, 10) is None
    assert update_problem(_record({"a": GLOBAL["a"] + 3, "b": GLOBAL["b"]}), GLOBAL, 5) \
        == "update L2 norm 7.348 above update_checks.max_update_norm 5"
    assert update_problem(_record({**GLOBAL, "c": GLOBAL["b"]}), GLOBAL, None) \
        == "keys differ from the global adapter: unexpected ['c']"


def _reply(node: int, arrays: ArrayRecord | None, weight: float = 1.0) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                      message_type=MessageType.TRAIN)
    if arrays is None:
        return Message(Error(code=1, reason="crashed"), reply_to=request)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {m.WEIGHT_KEY: weight})}), reply_to=request)


def _check(drop_after: int = 3, summed: bool = False):
    dropped = []
    check = UpdateCheck(FedAvg(weighted_by_key=m.WEIGHT_KEY), UpdateCheckSettings(
        max_update_norm=100.0, drop_after=drop_after), lambda node: node - 100,
        lambda node, why: dropped.append((node, why)), summed=summed)
    check._global = {k: v.astype(np.float64) for k, v in GLOBAL.items()}
    return check, dropped


def test_the_aggregate_is_fedavg_over_the_sound_replies_and_a_repeat_offender_is_dropped(
        process_identity):
    good = {101: {k: v + 1 for k, v in GLOBAL.items()}, 102: {k: v + 4 for k, v in GLOBAL.items()}}
    check, dropped = _check(drop_after=2)
    for server_round in (1, 2):
        replies = [_reply(101, _record(good[101]), 1.0), _reply(102, _record(good[102]), 3.0),
                   _reply(103, broken(_record(good[101]), Fault.nan)), _reply(104, None)]
        aggregate, _ = check.aggregate_train(server_round, replies)
        for key in GLOBAL:  # (1 x (g+1) + 3 x (g+4)) / 4
            np.testing.assert_allclose(aggregate[key].numpy(), GLOBAL[key] + 3.25)
        rejections, largest = check.take_round()
        assert [(r.hospital, r.reason) for r in rejections] == [(3, "a: NaN values")]
        assert largest == pytest.approx(4 * np.sqrt(10))  # hospital 2's: 4 on 10 values
    assert check.rejected_total == {3: 2}
    assert dropped == [(103, "hospital 3 dropped after 2 rejected updates "
                             "(update_checks.drop_after=2); last: a: NaN values")]


def test_under_secure_aggregation_a_bad_sum_names_no_hospital_and_aggregates_nothing(
        process_identity):
    check, dropped = _check(drop_after=1, summed=True)
    bad_sum = broken(_record(GLOBAL), Fault.inf)
    aggregate, _ = check.aggregate_train(1, [_reply(101, bad_sum), _reply(102, bad_sum)])
    assert aggregate is None and dropped == [] and check.rejected_total == {}
    [rejection], _ = check.take_round()
    assert rejection.hospital == -1 and rejection.reason.startswith(
        "secure aggregate of hospitals [1, 2]: a: Inf values")


FAULTS = {1: "nan", 2: "inf", 3: "missing_key", 4: "wrong_shape"}
# Unweighted and FedAvg's own head rows: the reference below trains the hospitals again from
# these settings alone and averages by records (class weights and class-wise head rows would
# come from the run's preflight counts).
COMMON = ("num_rounds=1", "data.notes_per_hospital=40", "data.server_test_notes=0",
          "train.local_epochs=1", "update_checks.drop_after=1", "train.class_weighting=none",
          "strategy.head_aggregation=examples")


@pytest.mark.e2e
def test_faulty_hospitals_are_rejected_named_and_dropped_in_a_real_run(tiny_bert, tmp_path):
    faults = "[" + ",".join(f"{h}:{f}" for h, f in FAULTS.items()) + "]"
    superlink = LocalSimulationSuperLink(tmp_path / "home")
    try:
        status, details, output = superlink.flwr_run(
            run_overrides(tiny_bert, tmp_path, *COMMON, f"drill.faults={faults}"), hospitals=6)
    finally:
        superlink.stop()
    assert status == "finished:completed", f"{details}\n{output[-4000:]}"

    client, run = only_run(tmp_path)
    run_id = run.info.run_id
    metrics = {key: client.get_metric_history(run_id, key)[-1].value
               for key in ("round/rejected_replies", "round/train_replies")}
    assert metrics == {"round/rejected_replies": 4, "round/train_replies": 2}
    local = client.download_artifacts(run_id, "rejections/round_0001.json", str(tmp_path))
    rejections = {r["hospital"]: r["reason"] for r in json.loads(open(local).read())}
    assert sorted(rejections) == [1, 2, 3, 4]
    assert rejections[1].endswith("NaN values") and rejections[2].endswith("Inf values")
    assert rejections[3].startswith("keys differ") and "shape" in rejections[4]
    for hospital in FAULTS:  # dropped after one rejection (drop_after=1), and why
        assert run.data.tags[f"refused/hospital_{hospital}"].startswith(
            f"hospital {hospital} dropped after 1 rejected updates")

    # The global adapter is FedAvg over hospitals 0 and 5 alone: their own training, redone
    # here with the same handler, weighted by their training records.
    settings = task_settings_to_yaml(task(tiny_bert, *COMMON))
    replies = [hospital_train_reply(settings, tmp_path / f"h{h}", 1, 1,
                                    {"partition-id": h, "num-partitions": 6}) for h in (0, 5)]
    weights = [metrics[m.WEIGHT_KEY] for metrics, _ in replies]
    [checkpoint_file] = (tmp_path / "server-state").glob(f"*/{CHECKPOINT_FILE}")
    aggregate = load_checkpoint(checkpoint_file).arrays
    for key, value in aggregate.items():
        expected = sum(w * arrays[key].numpy() for w, (_, arrays) in zip(weights, replies,
                                                                          strict=True))
        np.testing.assert_allclose(value, expected / sum(weights), rtol=1e-4, atol=1e-6,
                                   err_msg=key)


@pytest.mark.parametrize("override, message", [
    ('drill.faults=["1:nanx"]', "'drill.faults': got '1:nanx', expected '<hospital>:<fault>'"),
    ('drill.faults=["one:nan"]', "'drill.faults': got 'one:nan'"),
    ('drill.faults=["1:exit@2"]', "got '1:exit@2'"),  # exit: a deployed hospital's own only
    ("update_checks.max_update_norm=0", "'update_checks.max_update_norm': got 0.0, expected "
                                        "greater than 0, or null"),
    ("update_checks.drop_after=0", "'update_checks.drop_after': got 0, expected at least 1"),
])
def test_bad_drill_and_update_check_settings_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config([override])


def _drilled_train(settings_yaml, state_dir, server_round, node_config=None):
    """The train handler through the fault drill's mod, as the ClientApp registers it."""
    from fl_app.hospital.client_app import train
    from tests.hospital_process import NODE, _context

    context = _context(1, state_dir, node_config)
    config = ConfigRecord({m.TASK_KEY: settings_yaml, m.SERVER_ROUND_KEY: server_round})
    msg = Message(RecordDict({m.ARRAYS_RECORD: initial_arrays(settings_yaml),
                              m.CONFIG_RECORD: config}), dst_node_id=NODE,
                  message_type=MessageType.TRAIN)
    return fault_drill_mod(msg, context, train)


def test_a_deployed_hospital_refuses_the_servers_drill_and_drills_by_its_own_config(
        tiny_bert, tmp_path):
    asked = task_settings_to_yaml(task(tiny_bert, 'drill.faults=["0:nan"]'))
    with pytest.raises(TaskInputError, match="a deployed hospital only drills by its own "
                                             "node config"):
        _drilled_train(asked, tmp_path, 1)  # state-dir in its node config: deployed
    plain = task_settings_to_yaml(task(tiny_bert))
    own = {"fault-drill": "inf@1"}
    arrays = _drilled_train(plain, tmp_path, 1, own).content[m.ARRAYS_RECORD]
    assert any(np.isinf(a.numpy()).any() for a in arrays.values())
    arrays = _drilled_train(plain, tmp_path, 2, own).content[m.ARRAYS_RECORD]
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
