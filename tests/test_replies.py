"""What leaves a hospital: trainable-parameter arrays (float32) and numeric metrics only."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clinical_fl.protocol import messages as m
from clinical_fl.settings.model import ModelSettings
from clinical_fl.tracking.round_log import mlflow_metrics
from fl_app.hospital.replies import (
    distributed_share_reply,
    evaluate_reply,
    preflight_reply,
    train_reply,
)
from fl_app.server.grids.metered import payload_bytes
from tasks.learning.evaluation import EvalOutcome
from tasks.learning.training import PrivacyReport, TrainOutcome
from tasks.model.build import build_model, trainable_state
from tasks.privacy.lattice import Lattice

LABELS = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def _process_identity(process_identity):
    """Every test here builds messages."""


def _instruction(message_type):
    return Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1,
                   message_type=message_type)


def test_train_reply_holds_the_trainable_arrays_and_numeric_metrics_only(tiny_random_bert):
    model = build_model(ModelSettings(name_or_path=str(tiny_random_bert)), LABELS, seed=0)
    state = trainable_state(model)
    msg = _instruction("train")
    reply = train_reply(msg, state, TrainOutcome(1.2, 40, 3, 0.5), hospital=1)
    content = reply.content
    assert list(content.array_records) == ["arrays"] and list(content.metric_records) == ["metrics"]
    assert not content.config_records
    arrays = content.array_records["arrays"]
    assert set(arrays) == set(state)
    assert all(a.dtype == "float32" for a in arrays.values())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(arrays), "no frozen base weight leaves the hospital"
    metrics = content.metric_records["metrics"]
    assert set(metrics) == {"num-examples", "aggregation-weight", "train-loss",
                            "train-seconds", "hospital"}
    assert metrics["num-examples"] == metrics["aggregation-weight"] == 40
    assert payload_bytes(content) >= sum(v.numel() * 4 for v in state.values())


def test_evaluate_reply_carries_counts_not_records():
    outcome = EvalOutcome(0.7, 0.5, 0.4, 10, [2, 3, 0], [1, 2, 2], [3, 0, 2])
    reply = evaluate_reply(_instruction("evaluate"), outcome, hospital=0)
    assert not reply.content.array_records and not reply.content.config_records
    metrics = reply.content.metric_records["metrics"]
    assert metrics["true-positives"] == [2, 3, 0]
    assert all(isinstance(v, int | float | list) for v in metrics.values())


def test_payload_bytes_counts_arrays_metrics_and_config_with_empty_strings():
    content = RecordDict({"a": ArrayRecord({"w": torch.zeros(10)}),
                          "m": MetricRecord({"x": 1.0}), "c": ConfigRecord({"s": ""})})
    assert payload_bytes(content) >= 40 + 8 + 1


def test_a_private_train_reply_states_its_cumulative_privacy_and_weight_for_central_dp():
    report = PrivacyReport(epsilon=2.5, delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0,
                           sample_rate=0.0667, steps=30, max_epsilon=8.0,
                           can_train_next_round=True)
    outcome = TrainOutcome(1.2, 40, 3, 0.5, privacy=report)
    reply = train_reply(_instruction("train"), {"w": torch.zeros(2)}, outcome, hospital=1,
                        equal_weight=True)
    metrics = reply.content.metric_records["metrics"]
    assert metrics["epsilon"] == 2.5 and metrics["delta"] == 1e-5
    assert metrics["noise-multiplier"] == 1.1 and metrics["dp-steps"] == 30
    assert metrics["can-train-next"] == 1 and metrics["aggregation-weight"] == 1
    assert "train-loss" not in metrics, "an unprotected statistic of the training records"
    assert "train-seconds" not in metrics, "a round's duration follows its Poisson batches"


def test_a_refusal_sends_no_update_only_its_code_key_and_counts():
    from fl_app.hospital.edge import refusal_for, refusal_message
    from tasks.privacy.plan import PrivacyBudgetError

    err = PrivacyBudgetError("hospital 1: privacy budget: round 3 would raise epsilon from "
                             "2.9 to 3.2 (/secret/path)", key="max-epsilon")
    reply = refusal_message(_instruction("train"), refusal_for(err))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == 4031
    assert reply.error.reason == "4031 privacy-budget-refused key=max-epsilon"


def _private_outcome():
    report = PrivacyReport(epsilon=2.5, delta=1e-5, noise_multiplier=1.1, max_grad_norm=1.0,
                           sample_rate=0.0667, steps=30, max_epsilon=8.0,
                           can_train_next_round=True)
    return TrainOutcome(1.2, 40, 3, 0.5, privacy=report)


def test_every_metric_a_hospital_sends_has_a_row_in_the_protocol_table():
    """The one table (clinical_fl/protocol/messages.py) covers every reply; under DP-SGD a
    reply holds exactly the metrics the table allows under DP-SGD."""
    state = {"w": torch.zeros(2)}
    train_rows = m.metric_table("train")
    plain = train_reply(_instruction("train"), state, TrainOutcome(1.2, 40, 3, 0.5), 1)
    private = train_reply(_instruction("train"), state, _private_outcome(), 1)
    distributed_outcome = _private_outcome()
    distributed_outcome.privacy.epsilon_if_alone = 40.0
    distributed = distributed_share_reply(_instruction("train"), {"w": np.zeros(2, np.uint32)},
                                          distributed_outcome, 1, Lattice(0.25, 2**24), 2)
    plain_keys = set(plain.content.metric_records[m.METRICS_RECORD])
    private_keys = set(private.content.metric_records[m.METRICS_RECORD])
    distributed_keys = set(distributed.content.metric_records[m.METRICS_RECORD])
    assert distributed_keys == private_keys | {m.EPSILON_IF_ALONE}
    # The secure-aggregation mod adds its own row to every reply it masks or encrypts
    # (tests/test_secure_aggregation.py checks those replies against this table too).
    sent = plain_keys | private_keys | distributed_keys | {m.SECAGG_SECONDS}
    assert sent <= set(train_rows)
    assert sent == set(train_rows), "a row no reply ever sends"
    assert private_keys | distributed_keys | {m.SECAGG_SECONDS} == {
        k for k, row in train_rows.items() if row.under_dp_sgd}
    outcome = EvalOutcome(0.7, 0.5, 0.4, 10, [2, 3, 0], [1, 2, 2], [3, 0, 2])
    evaluated = evaluate_reply(_instruction("evaluate"), outcome, hospital=0)
    assert set(evaluated.content.metric_records[m.METRICS_RECORD]) == set(
        m.metric_table("evaluate"))


def test_a_combined_metric_without_an_mlflow_row_is_an_error_not_a_silent_drop():
    names = m.mlflow_names("train")
    assert mlflow_metrics({m.EPSILON: 1.0, m.REPLIES: 2}, names) == {
        "privacy/epsilon_max": 1.0, "round/train_replies": 2}
    with pytest.raises(KeyError, match="no row in clinical_fl/protocol"):
        mlflow_metrics({"made-up": 1.0}, names)


def test_preflight_replies_use_the_protocol_keys():
    reply = preflight_reply(_instruction("query"), 2, [3, 4], 7, 2, declined="no DP")
    status = reply.content.config_records[m.PREFLIGHT_STATUS_RECORD]
    counts = reply.content.metric_records[m.PREFLIGHT_COUNTS_RECORD]
    assert status[m.PREFLIGHT_OK] and status[m.PREFLIGHT_DECLINED] == "no DP"
    assert counts[m.LABEL_COUNTS] == [3, 4] and counts[m.TRAIN_RECORDS] == 7


@pytest.mark.parametrize("lattice,threshold,message", [
    (Lattice(4.0, 2**24), 2, r"on the lattice \(clipping range, levels\) \(4.0, 16777216\)"),
    (Lattice(0.25, 2**24), 3, "assumes at least 3 hospitals"),
])
def test_a_distributed_share_that_does_not_fit_the_rounds_secure_aggregation_is_refused(
        lattice, threshold, message):
    """The hospital's secure-aggregation mod masks a distributed DP share only on the lattice
    this round sums on, and only if SecAgg+ releases no sum of fewer hospitals than its noise
    share assumes."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from clinical_fl.secure_aggregation import secagg_plus
    from fl_app.hospital.secure_aggregation_mod import StageRefused, _lattice_share

    # This round: c 0.25, threshold 2.
    secrets, _ = secagg_plus.setup(1, 1, 2, 0.25, 2**24, 1.0, run_id=1,
                                   signer=ec.generate_private_key(ec.SECP384R1()))
    start = {"w": np.zeros(2, np.float32)}
    reply = distributed_share_reply(_instruction("train"), {"w": np.zeros(2, np.uint32)},
                                    _private_outcome(), 1, lattice, threshold)
    with pytest.raises(StageRefused, match=message):
        _lattice_share(reply, start, secrets)
    fits = distributed_share_reply(_instruction("train"), {"w": np.zeros(2, np.uint32)},
                                   _private_outcome(), 1, Lattice(0.25, 2**24), 2)
    assert list(_lattice_share(fits, start, secrets)) == [0, 0]
