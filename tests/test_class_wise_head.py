"""strategy.head_aggregation=class_counts: each class's head row averaged over the hospitals
that hold the class (strategies/class_wise_head.py), through Flower's real FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy import FedAvg

from clinical_fl.protocol import messages as m
from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, to_run_settings
from fl_app.server.head_aggregation import label_skewed, resolve_head_aggregation
from strategies.class_wise_head import ClassWiseHead, class_wise_rows
from tasks.model.build import build_model, trainable_state
from tasks.model.windows import head_parameter_names
from tests.support import task


def test_imbalance_class_wise_rows_match_a_hand_computation():
    # Two hospitals, three classes: class 0 held by both (3 and 1 records), class 1 by the
    # second only, class 2 by nobody (keeps the fallback row).
    first = np.array([[1.0, 1.0], [5.0, 5.0], [7.0, 7.0]], np.float32)
    second = np.array([[3.0, -1.0], [2.0, 4.0], [9.0, 9.0]], np.float32)
    fallback = np.array([[0.0, 0.0], [0.0, 0.0], [-1.0, -2.0]], np.float32)
    rows = class_wise_rows([first, second], [[3, 0, 0], [1, 6, 0]], fallback)
    np.testing.assert_allclose(rows, [[(3 * 1 + 3) / 4, (3 * 1 - 1) / 4], [2.0, 4.0],
                                      [-1.0, -2.0]])
    assert rows.dtype == np.float32
    bias = class_wise_rows([np.array([1.0, 2.0, 3.0]), np.array([5.0, 6.0, 7.0])],
                           [[3, 0, 0], [1, 6, 0]], np.zeros(3))
    np.testing.assert_allclose(bias, [2.0, 6.0, 0.0])


def _reply(node: int, arrays: dict[str, np.ndarray], weight: float) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node,
                      message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({m.ARRAYS_RECORD: record, "metrics": MetricRecord(
        {m.WEIGHT_KEY: weight})}), reply_to=request)


def test_imbalance_class_wise_head_replaces_only_the_head_rows_of_fedavgs_aggregate(
        process_identity):
    head = np.array([[1.0, 1.0], [1.0, 1.0]], np.float32)
    replies = [
        _reply(11, {"body": np.full(3, 2.0, np.float32), "head": head * 4}, weight=1),
        _reply(12, {"body": np.full(3, 6.0, np.float32), "head": head * 8}, weight=3),
    ]
    strategy = ClassWiseHead(FedAvg(weighted_by_key=m.WEIGHT_KEY), ["head"],
                             {11: [10, 0], 12: [0, 5]})
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["body"].numpy(), np.full(3, 5.0))  # FedAvg: 1:3
    np.testing.assert_allclose(arrays["head"].numpy(), [[4.0, 4.0], [8.0, 8.0]])
    plain, _ = FedAvg(weighted_by_key=m.WEIGHT_KEY).aggregate_train(1, replies)
    np.testing.assert_allclose(plain["head"].numpy(), [[7.0, 7.0], [7.0, 7.0]])


def test_imbalance_the_heads_parameters_are_found_by_name(tiny_bert):
    settings = task(tiny_bert, labels=["a", "b", "c"])
    model = build_model(settings.model, ["a", "b", "c"], 0)
    names = head_parameter_names(model, 3)
    state = trainable_state(model)
    assert len(names) == 2 and all(state[name].shape[0] == 3 for name in names)
    assert any(name.endswith("weight") for name in names)


@pytest.mark.parametrize("overrides,expected", [
    (["strategy=fedadam"], "strategy.name=fedadam"),
    (["privacy=dp_sgd"], "privacy.mechanism=dp_sgd"),
    (["secure_aggregation=secagg_plus"], "secure aggregation"),
])
def test_imbalance_class_wise_head_is_refused_where_it_cannot_hold(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as refused:
        to_run_settings(compose_config([*overrides,
                                        "strategy.head_aggregation=class_counts"]))
    assert refused.value.key == "strategy.head_aggregation"


def test_imbalance_label_skew_is_a_class_some_hospital_lacks_and_another_holds():
    assert label_skewed([[5, 0, 3], [2, 4, 0]])
    assert not label_skewed([[5, 1, 3], [2, 4, 1]])
    assert not label_skewed([[5, 0, 3], [2, 0, 1]]), "a class nobody holds is no skew"
    assert not label_skewed([[5, 0, 3], []]), "a hospital withheld its counts"
    assert not label_skewed([])


@pytest.mark.parametrize("overrides,counts,chosen,scale", [
    ([], [[5, 0], [0, 4]], "class_counts", 0.0),  # auto, skewed: the restricted softmax at 0
    ([], [[5, 1], [2, 4]], "examples", None),  # auto, every hospital holds every class
    (["train.absent_class_scale=0.5"], [[5, 0], [0, 4]], "class_counts", 0.5),  # kept
    (["strategy=fedadam"], [[5, 0], [0, 4]], "examples", None),  # cannot hold there
    (["privacy=dp_sgd"], [[5, 0], [0, 4]], "examples", None),
    (["strategy.head_aggregation=examples"], [[5, 0], [0, 4]], "examples", None),
])
def test_imbalance_auto_head_aggregation_turns_on_only_for_label_skew(tiny_bert, overrides,
                                                                      counts, chosen, scale):
    from clinical_fl.settings.compose import task_settings

    cfg = compose_config(overrides)
    settings, task_ = to_run_settings(cfg), task_settings(cfg, ["a", "b"])
    assert resolve_head_aggregation(settings, task_, counts).value == chosen
    assert settings.strategy.head_aggregation.value == chosen
    assert task_.train.absent_class_scale == scale
