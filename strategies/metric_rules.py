"""How each metric a hospital reports is combined across hospitals: one explicit rule per key.

Flower's default averages every key weighted by examples. That is right for
accuracy and loss, wrong for counts (they add up), for timings (the round
waits for the slowest hospital), and for macro-F1: the federation's macro-F1
comes from the summed per-class counts, not from a mean of local scores.
A key with no rule is an error rather than silently averaged. The rules are the
protocol's table (``clinical_fl/protocol/messages.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.messages import Rule, released

Scalar = int | float
Value = Scalar | list[int] | list[float]

TRAIN_RULES: dict[str, Rule] = {row.key: row.rule for row in m.TRAIN_METRICS}
EVALUATE_RULES: dict[str, Rule] = {row.key: row.rule for row in m.EVALUATE_METRICS}


def macro_f1_from_counts(tp: list[float], fp: list[float], fn: list[float]) -> float:
    """Macro-F1 over all classes from summed counts; a class with no support and no
    predictions scores 0, as scikit-learn's ``zero_division=0`` does."""
    scores = []
    for t, p, n in zip(tp, fp, fn, strict=True):
        denom = 2 * t + p + n
        scores.append(2 * t / denom if denom else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def _add_federated_macro_f1(combined: dict[str, Value], records: list[MetricRecord],
                            weights: list[float]) -> None:
    """From the summed per-class counts when every hospital released them; otherwise the
    record-weighted mean of the local macro-F1 scores (partial counts would be wrong)."""
    if all(all(released(rec.get(k, [])) for k in m.COUNT_KEYS) for rec in records):
        combined[m.MACRO_F1] = macro_f1_from_counts(*[combined[k] for k in m.COUNT_KEYS])
        return
    for key in m.COUNT_KEYS:
        combined.pop(key, None)
    scored = [(float(rec[m.MACRO_F1]), w) for rec, w in zip(records, weights, strict=True)
              if m.MACRO_F1 in rec and released(rec[m.MACRO_F1])]
    if scored and sum(w for _, w in scored) > 0:
        combined[m.MACRO_F1] = _combine(Rule.WEIGHTED_MEAN, [v for v, _ in scored],
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
        combined[m.REPLIES] = len(records)
        self.latest = dict(combined)
        self.per_hospital = {
            int(rec[m.HOSPITAL]): {k: v for k, v in rec.items()
                                   if k != m.HOSPITAL and not isinstance(v, list)
                                   and released(v)}
            for rec in records if m.HOSPITAL in rec}
        return MetricRecord(combined)


def train_metrics_rules() -> MetricRules:
    return MetricRules(TRAIN_RULES)


def evaluate_metrics_rules() -> MetricRules:
    return MetricRules(EVALUATE_RULES, derive=_add_federated_macro_f1)
