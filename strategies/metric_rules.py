"""How each metric a hospital reports is combined across hospitals: one explicit rule per key.

Flower's default averages every key weighted by examples. That is right for
accuracy and loss, wrong for counts (they add up), for timings (the round
waits for the slowest hospital), and for macro-F1: the federation's macro-F1
comes from the summed per-class counts, not from a mean of local scores.
A key with no rule is an error rather than silently averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

from flwr.app import MetricRecord, RecordDict

Scalar = int | float
Value = Scalar | list[int] | list[float]


# A value a hospital's policy does not release: NaN for a score, an empty list for counts.
# Replies keep every key (Flower aggregates only replies with identical keys); rules skip it.
WITHHELD = math.nan


def released(value: Value) -> bool:
    if isinstance(value, list):
        return bool(value)
    return not (isinstance(value, float) and math.isnan(value))


class Rule(Enum):
    WEIGHTED_MEAN = "weighted_mean"  # by the weighting key (records seen)
    SUM = "sum"  # element-wise for lists
    MAX = "max"
    MIN = "min"
    MAX_AND_MEAN = "max_and_mean"  # the key holds the max; "<key>-mean" the plain mean
    PER_HOSPITAL = "per_hospital"  # reported per hospital, never combined


TRAIN_RULES: dict[str, Rule] = {
    "num-examples": Rule.SUM,
    "aggregation-weight": Rule.PER_HOSPITAL,
    "train-loss": Rule.WEIGHTED_MEAN,
    "train-seconds": Rule.MAX,
    "hospital": Rule.PER_HOSPITAL,
    # Record-level DP (DP-SGD), cumulative per hospital. The federation is as private as
    # its least private hospital: epsilon and delta by max, noise by min.
    "epsilon": Rule.MAX_AND_MEAN,
    "delta": Rule.MAX,
    "noise-multiplier": Rule.MIN,
    "clipping-norm": Rule.MAX,
    "sample-rate": Rule.MAX,
    "dp-steps": Rule.MAX,
    # The hospital's epsilon over every run on its ledger, at its own delta (its policy).
    "lifetime-epsilon": Rule.MAX,
    "lifetime-delta": Rule.MAX,
    "can-train-next": Rule.SUM,  # hospitals that can afford one more round
}

EVALUATE_RULES: dict[str, Rule] = {
    "num-examples": Rule.SUM,
    "aggregation-weight": Rule.PER_HOSPITAL,
    "eval-loss": Rule.WEIGHTED_MEAN,
    "accuracy": Rule.WEIGHTED_MEAN,
    "macro-f1": Rule.PER_HOSPITAL,  # local score; the federation's is derived below
    # Per-class counts: only from hospitals whose policy releases them (eval-metrics=full).
    "true-positives": Rule.SUM,
    "false-positives": Rule.SUM,
    "false-negatives": Rule.SUM,
    "hospital": Rule.PER_HOSPITAL,
}


def macro_f1_from_counts(tp: list[float], fp: list[float], fn: list[float]) -> float:
    """Macro-F1 over all classes from summed counts; a class with no support and no
    predictions scores 0, as scikit-learn's ``zero_division=0`` does."""
    scores = []
    for t, p, n in zip(tp, fp, fn, strict=True):
        denom = 2 * t + p + n
        scores.append(2 * t / denom if denom else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


_COUNT_KEYS = ("true-positives", "false-positives", "false-negatives")


def _add_federated_macro_f1(combined: dict[str, Value], records: list[MetricRecord],
                            weights: list[float]) -> None:
    """From the summed per-class counts when every hospital released them; otherwise the
    record-weighted mean of the local macro-F1 scores (partial counts would be wrong)."""
    if all(all(released(rec.get(k, [])) for k in _COUNT_KEYS) for rec in records):
        combined["macro-f1"] = macro_f1_from_counts(*[combined[k] for k in _COUNT_KEYS])
        return
    for key in _COUNT_KEYS:
        combined.pop(key, None)
    scored = [(float(rec["macro-f1"]), w) for rec, w in zip(records, weights, strict=True)
              if "macro-f1" in rec and released(rec["macro-f1"])]
    if scored and sum(w for _, w in scored) > 0:
        combined["macro-f1"] = _combine(Rule.WEIGHTED_MEAN, [v for v, _ in scored],
                                        [w for _, w in scored])


def _combine(rule: Rule, values: list[Value], weights: list[float]) -> Value:
    if rule == Rule.SUM:
        if isinstance(values[0], list):
            return [sum(column) for column in zip(*values, strict=True)]
        return sum(values)
    if rule in (Rule.MAX, Rule.MAX_AND_MEAN):
        return max(values)
    if rule == Rule.MIN:
        return min(values)
    total = sum(weights)
    if total <= 0:
        raise ValueError("cannot take a weighted mean: the weights add up to 0")
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


class MetricRules:
    """A Flower metrics-aggregation function with one rule per key.

    It also keeps each hospital's own values from the latest call, keyed by the
    ``hospital`` metric, so the server can log per-hospital curves.
    """

    def __init__(self, rules: dict[str, Rule],
                 derive: Callable[[dict[str, Value], list[MetricRecord], list[float]], None]
                 | None = None) -> None:
        self.rules = rules
        self.derive = derive
        self.per_hospital: dict[int, dict[str, Scalar]] = {}
        self.latest: dict[str, Value] = {}

    def take(self) -> tuple[dict[str, Value], dict[int, dict[str, Scalar]]]:
        """(combined, per-hospital) metrics of the latest call, then forget them, so a
        round whose replies all failed is not logged with the previous round's values."""
        taken = (self.latest, self.per_hospital)
        self.latest, self.per_hospital = {}, {}
        return taken

    def __call__(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        records = [rec for content in contents for rec in content.metric_records.values()]
        if not records:
            return MetricRecord()
        unknown = sorted({key for rec in records for key in rec} - self.rules.keys())
        if unknown:
            raise ValueError(f"no aggregation rule for metric(s) {unknown}; known keys are "
                             f"{sorted(self.rules)}")
        weights = [float(rec[weighted_by_key]) for rec in records]
        combined: dict[str, Value] = {}
        for key, rule in self.rules.items():
            pairs = [(rec[key], w) for rec, w in zip(records, weights, strict=True)
                     if key in rec and released(rec[key])]
            if pairs and rule != Rule.PER_HOSPITAL:
                combined[key] = _combine(rule, [v for v, _ in pairs], [w for _, w in pairs])
            if pairs and rule == Rule.MAX_AND_MEAN:
                combined[f"{key}-mean"] = sum(v for v, _ in pairs) / len(pairs)
        if self.derive:
            self.derive(combined, records, weights)
        combined["replies"] = len(records)
        self.latest = dict(combined)
        self.per_hospital = {
            int(rec["hospital"]): {k: v for k, v in rec.items()
                                   if k != "hospital" and not isinstance(v, list)
                                   and released(v)}
            for rec in records if "hospital" in rec}
        return MetricRecord(combined)


def train_metrics_rules() -> MetricRules:
    return MetricRules(TRAIN_RULES)


def evaluate_metrics_rules() -> MetricRules:
    return MetricRules(EVALUATE_RULES, derive=_add_federated_macro_f1)
