"""Accuracy against epsilon: the table and plot of a privacy sweep, read back from MLflow.

Every number comes from the runs' own MLflow records: the epsilon is the
largest cumulative epsilon any hospital reported in the final round, not the
target that was asked for.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

# The record-level mechanisms a sweep compares, each a series: its switch and its target.
MECHANISMS = {"dp_sgd": "privacy.dp_sgd", "distributed_dp": "privacy.distributed_dp"}
_STYLE = {"dp_sgd": ("o", "-"), "distributed_dp": ("s", "--"), "none": ("", ":")}


@dataclass
class SweepRow:
    mechanism: str  # dp_sgd, distributed_dp, or none (a non-private level)
    target_epsilon: float  # inf: no DP
    epsilon: float  # achieved: max over hospitals after the last round (inf: not private)
    delta: float | None
    rounds: int
    accuracy: float
    macro_f1: float
    central_accuracy: float | None
    central_macro_f1: float | None
    minutes: float
    status: str
    run_id: str


def _last(client: MlflowClient, run_id: str, key: str) -> tuple[int, float] | None:
    history = client.get_metric_history(run_id, key)
    if not history:
        return None
    last = max(history, key=lambda m: m.step)
    return last.step, last.value


def collect_sweep(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[SweepRow]:
    runs = client.search_runs([experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    rows = []
    for run in runs:
        rid = run.info.run_id
        accuracy, macro_f1 = _last(client, rid, "federated/accuracy"), _last(
            client, rid, "federated/macro_f1")
        if accuracy is None or macro_f1 is None:
            continue  # failed before any evaluation
        mechanism = run.data.params.get("privacy.mechanism", "none")
        mechanism = mechanism if mechanism in MECHANISMS else "none"
        target = math.inf if mechanism == "none" else float(
            run.data.params.get(f"{MECHANISMS[mechanism]}.target_epsilon", "inf") or "inf")
        epsilon = _last(client, rid, "privacy/epsilon_max")
        delta = _last(client, rid, "privacy/delta")
        central_acc = _last(client, rid, "central/accuracy")
        central_f1 = _last(client, rid, "central/macro_f1")
        end = run.info.end_time or run.info.start_time
        rows.append(SweepRow(
            mechanism=mechanism, target_epsilon=target, epsilon=epsilon[1] if epsilon else math.inf,
            delta=delta[1] if delta else None, rounds=accuracy[0], accuracy=accuracy[1],
            macro_f1=macro_f1[1], central_accuracy=central_acc[1] if central_acc else None,
            central_macro_f1=central_f1[1] if central_f1 else None,
            minutes=(end - run.info.start_time) / 60_000, status=run.info.status, run_id=rid))
    return sorted(rows, key=lambda r: (r.mechanism, r.epsilon, r.target_epsilon))


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf (no DP)"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 else f"{value:.{digits}f}"


def write_table(rows: list[SweepRow], directory: Path) -> tuple[Path, Path]:
    """``privacy_sweep.csv`` and ``privacy_sweep.md`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = directory / "privacy_sweep.csv", directory / "privacy_sweep.md"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(SweepRow.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    lines = ["| privacy | target epsilon | epsilon spent (max over hospitals) | delta | rounds | "
             "accuracy | macro-F1 | central accuracy | central macro-F1 | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.mechanism} | {_fmt(r.target_epsilon, 2)} | {_fmt(r.epsilon)} "
                     f"| {_fmt(r.delta, 2)} "
                     f"| {r.rounds} | {_fmt(r.accuracy)} | {_fmt(r.macro_f1)} "
                     f"| {_fmt(r.central_accuracy)} | {_fmt(r.central_macro_f1)} "
                     f"| {r.minutes:.1f} |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def plot_accuracy_vs_epsilon(rows: list[SweepRow], path: Path) -> Path | None:
    """Final accuracy and macro-F1 against epsilon spent (log scale); runs without DP-SGD
    are drawn as horizontal lines, since infinity has no place on the axis."""
    private = [r for r in rows if math.isfinite(r.epsilon)]
    public = [r for r in rows if not math.isfinite(r.epsilon)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4))
    series = [("accuracy", "federated accuracy", "tab:blue"),
              ("macro_f1", "federated macro-F1", "tab:orange"),
              ("central_accuracy", "central accuracy", "tab:green")]
    mechanisms = sorted({r.mechanism for r in private})
    for field, label, colour in series:
        for mechanism in mechanisms:  # one line per mechanism: dp_sgd beside distributed_dp
            points = [(r.epsilon, getattr(r, field)) for r in private
                      if r.mechanism == mechanism and getattr(r, field) is not None]
            marker, line = _STYLE.get(mechanism, ("^", "-."))
            if points:
                ax.plot([e for e, _ in points], [v for _, v in points], marker=marker,
                        linestyle=line, color=colour, label=f"{label}, {mechanism}")
        for r in public:
            if getattr(r, field) is not None:
                ax.axhline(getattr(r, field), color=colour, linestyle=":", alpha=0.7,
                           label=f"{label}, no DP ({r.rounds} rounds)")
    if private:
        ax.set_xscale("log")
        # Ticks at the epsilons actually spent, in plain numbers (log axes default to 2x10^0).
        # Mechanisms at the same target spend nearly the same epsilon: one tick per label.
        spent: list[float] = []
        for epsilon in sorted(r.epsilon for r in private):
            if not spent or epsilon > spent[-1] * 1.01:
                spent.append(epsilon)
        ax.set_xticks(spent, [f"{e:.3g}" for e in spent])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("epsilon spent (record-level, max over hospitals)")
    ax.set_ylabel("final score")
    ax.set_title("Accuracy against privacy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the data
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
