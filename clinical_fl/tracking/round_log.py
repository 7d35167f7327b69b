"""Round figures under their MLflow names, from the protocol's one table.

The server's end-of-round hook (``fl_app/server/round_end.py``) gathers a round's figures and
logs them through ``RunTracker.log_round`` under the names given here.
"""

from __future__ import annotations

from clinical_fl.protocol import messages as m

# Combined metric key -> MLflow name, and hospital metric key -> name under hospital_<k>/,
# both from the protocol's table.
TRAIN_NAMES = m.mlflow_names("train")
EVAL_NAMES = m.mlflow_names("evaluate")
HOSPITAL_NAMES = {row.key: row.per_hospital
                   for row in (*m.TRAIN_METRICS, *m.EVALUATE_METRICS)}


def mlflow_metrics(combined: dict, names: dict[str, str | None]) -> dict[str, float]:
    """Each combined metric under its MLflow name. A key outside the protocol's table is an
    error, not a silent drop; a key whose name is None is deliberately not logged."""
    unknown = sorted(set(combined) - names.keys())
    if unknown:
        raise KeyError(f"metric(s) {unknown} have no row in clinical_fl/protocol/messages.py")
    return {names[k]: v for k, v in combined.items() if names[k] is not None}
