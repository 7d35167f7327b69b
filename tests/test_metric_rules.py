import random

import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import f1_score

from clinical_fl.protocol.messages import WITHHELD, Rule
from strategies.metric_rules import (
    MetricRules,
    evaluate_metrics_rules,
    macro_f1_from_counts,
    train_metrics_rules,
)


def _reply(**metrics):
    return RecordDict({"metrics": MetricRecord(metrics)})


def _counts(truths, preds, k):
    tp, fp, fn = [0] * k, [0] * k, [0] * k
    for t, p in zip(truths, preds, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    return tp, fp, fn


def test_federated_macro_f1_equals_sklearn_on_the_pooled_predictions():
    rng = random.Random(0)
    k, hospitals = 5, []
    pooled_t, pooled_p = [], []
    for h, n in enumerate((30, 70, 5)):
        truths = [rng.randrange(k) for _ in range(n)]
        preds = [t if rng.random() < 0.6 else rng.randrange(k) for t in truths]
        pooled_t += truths
        pooled_p += preds
        tp, fp, fn = _counts(truths, preds, k)
        local = f1_score(truths, preds, labels=list(range(k)), average="macro", zero_division=0)
        hospitals.append(_reply(**{"num-examples": n, "eval-loss": 1.0 + h, "accuracy":
                                   sum(tp) / n, "macro-f1": local, "true-positives": tp,
                                   "false-positives": fp, "false-negatives": fn,
                                   "hospital": h}))
    rules = evaluate_metrics_rules()
    combined = rules(hospitals, "num-examples")
    expected = f1_score(pooled_t, pooled_p, labels=list(range(k)), average="macro",
                        zero_division=0)
    assert combined["macro-f1"] == pytest.approx(expected, abs=1e-12)
    assert combined["accuracy"] == pytest.approx(
        sum(t == p for t, p in zip(pooled_t, pooled_p, strict=True)) / len(pooled_t))
    assert combined["eval-loss"] == pytest.approx((30 * 1 + 70 * 2 + 5 * 3) / 105)
    assert combined["num-examples"] == 105 and combined["replies"] == 3
    latest, per_hospital = rules.take()
    assert set(per_hospital) == {0, 1, 2} and per_hospital[2]["num-examples"] == 5
    assert rules.take() == ({}, {}), "taken metrics are not logged twice"


def test_sum_and_max_rules():
    rules = train_metrics_rules()
    combined = rules([_reply(**{"num-examples": 10, "train-loss": 2.0, "train-seconds": 3.0,
                                "hospital": 0}),
                      _reply(**{"num-examples": 30, "train-loss": 1.0, "train-seconds": 9.0,
                                "hospital": 1})], "num-examples")
    assert combined["num-examples"] == 40
    assert combined["train-loss"] == pytest.approx(1.25)
    assert combined["train-seconds"] == 9.0
    assert "hospital" not in combined


def test_a_metric_without_a_rule_is_an_error_not_an_average():
    rules = MetricRules({"num-examples": Rule.SUM})
    with pytest.raises(ValueError, match=r"no aggregation rule for metric\(s\) \['epsilon'\]"):
        rules([_reply(**{"num-examples": 1, "epsilon": 3.0})], "num-examples")


def test_macro_f1_counts_a_class_nobody_predicted_or_had_as_zero():
    assert macro_f1_from_counts([1, 0], [0, 0], [0, 0]) == 0.5


def test_privacy_metrics_are_combined_by_the_least_private_hospital():
    rules = train_metrics_rules()
    common = {"num-examples": 10, "aggregation-weight": 1, "train-loss": 1.0,
              "train-seconds": 1.0, "clipping-norm": 1.0, "sample-rate": 0.1, "dp-steps": 30}
    combined = rules([
        _reply(**common, hospital=0, epsilon=2.0, delta=1e-5, **{"noise-multiplier": 1.1,
                                                                  "can-train-next": 1}),
        _reply(**common, hospital=1, epsilon=5.0, delta=4e-5, **{"noise-multiplier": 0.7,
                                                                  "can-train-next": 0}),
    ], "aggregation-weight")
    assert combined["epsilon"] == 5.0 and combined["epsilon-mean"] == 3.5
    assert combined["delta"] == 4e-5 and combined["noise-multiplier"] == 0.7
    assert combined["can-train-next"] == 1
    assert "aggregation-weight" not in combined


def test_withheld_values_are_skipped_and_macro_f1_falls_back_to_the_local_scores():
    """One hospital releases per-class counts, the other only its scores (its policy)."""

    full = MetricRecord({"num-examples": 30, "aggregation-weight": 30, "eval-loss": 1.0,
                         "accuracy": 0.9, "macro-f1": 0.8, "true-positives": [9, 18],
                         "false-positives": [1, 2], "false-negatives": [2, 1], "hospital": 0})
    aggregate = MetricRecord({"num-examples": 10, "aggregation-weight": 10, "eval-loss": 2.0,
                              "accuracy": 0.5, "macro-f1": 0.4, "true-positives": [],
                              "false-positives": [], "false-negatives": [], "hospital": 1})
    silent = MetricRecord({"num-examples": 60, "aggregation-weight": 60,
                           "eval-loss": WITHHELD, "accuracy": WITHHELD, "macro-f1": WITHHELD,
                           "true-positives": [], "false-positives": [],
                           "false-negatives": [], "hospital": 2})
    rules = evaluate_metrics_rules()
    combined = rules([RecordDict({"m": r}) for r in (full, aggregate, silent)],
                     "aggregation-weight")
    assert combined["accuracy"] == pytest.approx((0.9 * 30 + 0.5 * 10) / 40)
    assert combined["macro-f1"] == pytest.approx((0.8 * 30 + 0.4 * 10) / 40)
    assert "true-positives" not in combined, "partial counts would be wrong"
    assert combined["num-examples"] == 100
    _, per_hospital = rules.take()
    assert "accuracy" not in per_hospital[2] and per_hospital[1]["accuracy"] == 0.5
