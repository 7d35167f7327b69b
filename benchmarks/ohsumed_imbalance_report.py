"""Every finished run of OHSUMED's 23-class benchmark, scored at the round it shipped.

    .venv/bin/python benchmarks/ohsumed_imbalance_report.py [--experiment NAME]

One row per FINISHED MLflow run of ``ohsumed-benchmark-single23`` (``ohsumed_benchmark.py
--view single23``, any variant): the round whose adapter is the run's model (the tag
``best_round`` where early stopping kept one, else the last round scored), validation
macro-F1 there (``federated/macro_f1``: the hospitals' held-out 20% of the official training
documents), test accuracy and macro-F1 there (``central/*``: the official test split), the
test recall of the five smallest classes by training count, and how many classes the test
split never saw predicted right. Choose settings by the validation column; the test columns
are reported once.
"""

from __future__ import annotations

import argparse

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.paths import project_root
from clinical_fl.tracking.run_tracker import resolve_store

EXPERIMENT = "ohsumed-benchmark-single23"
# The five smallest classes by training documents (C22 9, C03 21, C02 25, C07 29, C09 35).
SMALLEST = ("C22", "C03", "C02", "C07", "C09")
LABELS = [f"C{n:02d}" for n in range(1, 24)]


def _at(client: MlflowClient, run_id: str, key: str, step: int) -> float | None:
    values = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
    return values[-1] if values else None


def _shipped_round(client: MlflowClient, run: Run) -> int:
    tag = run.data.tags.get("best_round")
    if tag:
        return int(tag)
    history = client.get_metric_history(run.info.run_id, "central/macro_f1")
    return max((m.step for m in history), default=0)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return f"no experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    lines = ["| run | shipped round | validation macro-F1 | test accuracy | test macro-F1 | "
             f"test recall {' '.join(SMALLEST)} | classes with zero test recall | wall minutes "
             "| MLflow run |", "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        run_id, step = run.info.run_id, _shipped_round(client, run)
        recalls = {label: _at(client, run_id, f"central/recall/{label}", step)
                   for label in LABELS}
        zero = sum(1 for value in recalls.values() if value == 0.0)
        minutes = (run.info.end_time - run.info.start_time) / 60_000
        lines.append(
            f"| {run.info.run_name} | {step} | "
            f"{_cell(_at(client, run_id, 'federated/macro_f1', step))} | "
            f"{_cell(_at(client, run_id, 'central/accuracy', step))} | "
            f"{_cell(_at(client, run_id, 'central/macro_f1', step))} | "
            f"{' '.join(_cell(recalls[label]) for label in SMALLEST)} | {zero} | "
            f"{minutes:.1f} | {run_id[:8]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=EXPERIMENT)
    args = parser.parse_args()
    uri = resolve_store(TrackingSettings(), project_root())[0]
    print(report(MlflowClient(tracking_uri=uri), args.experiment))


if __name__ == "__main__":
    main()
