"""The last thing a run prints: which MLflow run holds it, how well the model scores, where
the adapter is, and the commands that come next (open the UI, predict, serve, train on).

Every command names the MLflow run id, which ``clinical-fl-predict``, ``clinical-fl-serve``
and ``resume=`` need and which Flower's own output never shows.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from clinical_fl.settings.run import RunSettings
from clinical_fl.tracking.per_class import zero_recall
from clinical_fl.tracking.run_tracker import RunTracker
from fl_app.server.early_stopping import BEST_ROUND_TAG

# A note the default run's model gets right (cardiology), in the synthetic notes' words.
EXAMPLE_NOTE = ("Chest pain on exertion with pressure-like discomfort radiating to the left arm, "
                "worse with stairs and relieved by rest. Exam: grade 2/6 systolic murmur. "
                "Plan: exercise stress test, start a beta blocker.")


@dataclass
class FinishedRun:
    run_id: str
    run_name: str
    experiment: str
    tracking_uri: str
    num_rounds: int
    history: Mapping[int, Mapping[str, float]]  # round -> what was logged to MLflow
    adapter_logged: bool
    registered_model: str | None = None  # "models:/<name>@<alias>" when registered
    stopped_early: str | None = None
    best_round: int | None = None  # early stopping kept this round's adapter


def executable(name: str, root: Path) -> str:
    """How to call one of our executables: next to this Python (the project's .venv/bin),
    relative to the checkout when it lies inside it."""
    path = Path(sys.executable).parent / name
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _last(history: Mapping[int, Mapping[str, float]], key: str) -> tuple[int, float] | None:
    for server_round in sorted(history, reverse=True):
        value = history[server_round].get(key)
        if value is not None and value == value:  # NaN: withheld
            return server_round, value
    return None


def _scores(history: Mapping[int, Mapping[str, float]], prefix: str, where: str,
            at_round: int | None = None) -> str:
    """The scores of the adapter the run ships: round ``at_round`` (early stopping's best),
    else the latest round that measured ``prefix``'s accuracy; its macro-F1 when that round
    has one (never another round's)."""
    if at_round is not None and f"{prefix}/accuracy" in history.get(at_round, {}):
        accuracy = at_round, history[at_round][f"{prefix}/accuracy"]
    else:
        accuracy = _last(history, f"{prefix}/accuracy")
    if accuracy is None:
        return f"  {prefix:<10} not measured"
    text = f"  {prefix:<10} accuracy {accuracy[1]:.3f}"
    f1 = history[accuracy[0]].get(f"{prefix}/macro_f1")
    if f1 is not None and f1 == f1:
        text += f", macro-F1 {f1:.3f}"
    return text + f" (round {accuracy[0]}, {where})"


def _never_found(history: Mapping[int, Mapping[str, float]], prefix: str) -> str | None:
    """A warning naming the classes the last round with per-class figures never found."""
    scored = [r for r in sorted(history) if any(k.startswith(f"{prefix}/recall/")
                                                  for k in history[r])]
    if not scored:
        return None
    missed = zero_recall(history[scored[-1]], prefix)
    if not missed:
        return None
    return (f"  WARNING    {prefix}: {len(missed)} class(es) never found in round "
            f"{scored[-1]} (recall 0): {', '.join(missed)}")


def ui_command(tracking_uri: str, root: Path) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return (f"{executable('mlflow', root)} ui --backend-store-uri {shlex.quote(tracking_uri)}"
            " --port 5000   # then http://127.0.0.1:5000")


def summary(run: FinishedRun, root: Path) -> str:
    """The lines printed at the end of a run."""
    lines = [f"MLflow run {run.run_name} ({run.run_id}), experiment {run.experiment}"
             + (f"; stopped early: {run.stopped_early}" if run.stopped_early else ""),
             _scores(run.history, "federated", "the hospitals' held-out notes",
                     run.best_round),
             _scores(run.history, "central", "the server's test notes", run.best_round)]
    lines += [line for line in (_never_found(run.history, "federated"),
                                _never_found(run.history, "central")) if line]
    model = f"--model {run.registered_model}" if run.registered_model else \
        f"--run-id {run.run_id}"
    if run.adapter_logged:
        lines.append(f"  adapter    MLflow artifact runs:/{run.run_id}/adapter"
                     + (f" (round {run.best_round}, the best)" if run.best_round is not None
                        else "")
                     + (f", registered as {run.registered_model}" if run.registered_model
                        else ""))
    lines += ["Next:", f"  MLflow UI  {ui_command(run.tracking_uri, root)}"]
    if run.adapter_logged:
        lines += [f"  predict    {executable('clinical-fl-predict', root)} {model} "
                  f"--text {shlex.quote(EXAMPLE_NOTE)}",
                  f"  serve      {executable('clinical-fl-serve', root)} {model} --tls-cert "
                  "CERT --tls-key KEY --token-file TOKENS   # docs/serving.md"]
    lines.append(f"  train on   {executable('clinical-fl', root)} resume={run.run_id} "
                 f"num_rounds={run.num_rounds * 2}   # or after a crash: resume={run.run_id}")
    return "\n".join(lines)


def finished_run(tracker: RunTracker, settings: RunSettings) -> FinishedRun:
    """What the summary says, from the closed MLflow run."""
    closed = tracker.summary
    return FinishedRun(
        run_id=closed.run_id, run_name=closed.run_name, experiment=closed.experiment_name,
        tracking_uri=closed.tracking_uri, num_rounds=settings.num_rounds,
        history=tracker.history, adapter_logged=settings.tracking.save_adapter,
        registered_model=closed.model_uri, stopped_early=tracker.tag("stopped_early"),
        best_round=int(best) if (best := tracker.tag(BEST_ROUND_TAG)) else None)
