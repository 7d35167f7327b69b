"""``clinical-fl-audit``: an empirical privacy audit of one federated run (lower-bounds epsilon).

    clinical-fl-audit                                         # non-private
    clinical-fl-audit privacy=dp_sgd privacy.dp_sgd.target_epsilon=8
    clinical-fl-audit --canaries 500 --out audit.json privacy=dp_sgd ...
    clinical-fl-audit privacy=distributed_dp privacy.distributed_dp.target_epsilon=8

One-run audit in the manner of Steinke, Nasr and Jagielski (NeurIPS 2023): m
canaries of each kind go into hospital 0's training records, each with
probability 1/2; the product's own federated code (the same ClientApp and
ServerApp, a ``flwr run`` simulation) trains; every canary is scored; the k
most and least confident are guessed in and out; the number right becomes an
epsilon lower bound (tasks/audit/bound.py).

- black-box: note canaries, scored by the final global model's loss;
- white-box: gradient canaries, scored on what the server receives of hospital
  0: its updates (view ``hospital_update``), or under secure aggregation, where
  the server never holds one hospital's update (``privacy=distributed_dp`` over
  SecAgg+ or CKKS, or any mode of ``secure_aggregation``), each round's released
  aggregate (view ``secure_sum``; strategies/update_recorder.py). The report's
  ``white_box.view`` says which.

The two bounds hold together at --confidence (default 95%): each is computed at
1 - (1 - confidence) / 2 (Bonferroni over the two), and within each, Bonferroni
again over the k values tried.

A lower bound above the claimed epsilon is a bug in the privacy machinery.
The audit's own training settings (AUDIT_SETTINGS) are the same for every
privacy level; overrides after them win. Writes a JSON report and logs it, with
``audit/*`` metrics, to the run's MLflow run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from clinical_fl.settings.compose import ConfigError, compose_config, to_run_settings
from clinical_fl.tracking.paths import project_root
from clinical_fl.tracking.run_tracker import resolve_store
from fl_app.commands.cli import _stream, flwr_run_command, write_run_config
from fl_app.commands.flower_env import flower_env
from fl_app.commands.flower_runs import COMPLETED, run_status, started_run_id
from fl_app.server.data_check import checked_labels
from strategies.update_recorder import audit_view
from tasks.audit.bound import guess_and_bound, per_bound_confidence
from tasks.audit.canaries import GRADIENT, NOTE, make_canaries, write_canaries
from tasks.audit.scores import black_box_scores, white_box_scores
from tasks.model.build import load_adapter

# The audit's training, the same at every privacy level: plain SGD (so an update is a sum
# of noisy gradients and its projections add up), two short rounds, short notes.
AUDIT_SETTINGS = [
    "num_rounds=2", "train.local_epochs=1", "train.optimizer=sgd", "train.learning_rate=0.1",
    "train.head_learning_rate=null", "train.batch_size=16", "model.max_length=64",
    "data.server_test_notes=0", "tracking.experiment=clinical-fl-audit",
    # The same objective and rounds at every privacy level: private runs train unweighted
    # (label counts withheld) and every planned round, so the non-private level does too.
    "train.class_weighting=none", "early_stopping.enabled=false", "train.absent_class_scale=1",
]
DEFAULT_DELTA = 1e-5  # for the bound of a run that claims no epsilon
AUDITORS = ("white_box", "black_box")  # the bounds reported together, under one confidence


def _find_run(uri: str, experiment: str, run_name: str):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id],
                              f"tags.mlflow.runName = '{run_name}'") if found else []
    if not runs:
        raise RuntimeError(f"no MLflow run named {run_name} in experiment {experiment}")
    return client, runs[0]


def _last(client: MlflowClient, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: m.step).value if history else None


def _bounds(scores: list[float], included: list[bool], guesses: list[int], delta: float,
            confidence: float) -> dict:
    best, tried = guess_and_bound(scores, included, guesses, delta, confidence)
    return {"epsilon_lower_bound": best.epsilon_lower_bound, "guesses": best.guesses,
            "correct": best.correct, "canaries": len(scores),
            "tried": [vars(t) for t in tried]}


def audit_bounds(scores: dict[str, list[float]], included: dict[str, list[bool]],
                 guesses: list[int], delta: float, confidence: float) -> dict[str, dict]:
    """The bound of each auditor in ``AUDITORS``, all of them holding together at
    ``confidence``: each computed at the Bonferroni-corrected confidence (a reader takes
    the larger of the two, so both must hold at once)."""
    each = per_bound_confidence(confidence, len(AUDITORS))
    return {mode: {**_bounds(scores[mode], included[mode], guesses, delta, each),
                   "confidence": each}
            for mode in AUDITORS}


def run_audit(overrides: list[str], canaries_per_kind: int, guesses: list[int],
              confidence: float, work: Path, federation_config: str | None = None) -> dict:
    """Train once with canaries in hospital 0 and return the audit report."""
    overrides = AUDIT_SETTINGS + overrides
    cfg = compose_config(overrides)  # fails here, before any training, on a bad override
    settings = to_run_settings(cfg)
    # The audit's hospitals are simulated here: every data check holds before training.
    labels = checked_labels(settings.data, hospitals_read_here=True)
    canaries = make_canaries(canaries_per_kind, len(labels))
    key = write_canaries(canaries, work / "auditor-key.jsonl")  # never sent
    given = write_canaries([c for c in canaries if c.included], work / "hospital-0.jsonl")
    updates = work / "updates"
    run_name = f"audit-{uuid.uuid4().hex[:12]}"
    overrides += [f"audit.canaries_path={given}", "audit.hospital=0",
                  f"audit.updates_dir={updates}", f"tracking.run_name={run_name}"]
    env = flower_env()
    output = _stream(flwr_run_command(write_run_config(overrides, work / "run.toml"),
                                      federation_config=federation_config), env)
    flwr_run = started_run_id(output)
    status, details = run_status(flwr_run, env=env) if flwr_run else ("not started", "")
    if status != COMPLETED:
        raise RuntimeError(f"the audited run did not complete: {status} {details}")

    uri, _ = resolve_store(settings.tracking, project_root())
    client, run = _find_run(uri, settings.tracking.experiment, run_name)
    claimed = _last(client, run.info.run_id, "hospital_0/epsilon")
    delta = _last(client, run.info.run_id, "hospital_0/delta") or DEFAULT_DELTA

    notes = [c for c in canaries if c.kind == NOTE]
    gradients = [c for c in canaries if c.kind == GRADIENT]
    view = audit_view(settings.secure_aggregation.enabled)  # what the recorder kept
    white = white_box_scores(sorted(updates.glob("round-*.npz")), canaries)
    adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                  artifact_path="adapter", tracking_uri=uri,
                                                  dst_path=str(work / "adapter"))
    model, tokenizer, _, max_length = load_adapter(adapter)
    black = black_box_scores(model, tokenizer, canaries, max_length)
    report = {
        "mlflow_run_id": run.info.run_id, "flwr_run_id": flwr_run,
        "privacy": run.data.tags.get("privacy", "none"),
        "epsilon_claimed": claimed if claimed is not None else math.inf,
        "delta": delta, "confidence": confidence, "canaries_per_kind": canaries_per_kind,
        "overrides": overrides[:-4], "auditor_key": str(key),
        **audit_bounds({"white_box": white, "black_box": black},
                       {"white_box": [c.included for c in gradients],
                        "black_box": [c.included for c in notes]},
                       guesses, delta, confidence),
    }
    report["white_box"]["view"] = view
    report["epsilon_lower_bound"] = max(report["white_box"]["epsilon_lower_bound"],
                                        report["black_box"]["epsilon_lower_bound"])
    client.log_dict(run.info.run_id, report, "audit/report.json")
    client.set_tag(run.info.run_id, "audit/white_box_view", view)
    # The verdict as the local audit tags it: a bound above the claim is a bug to report.
    report["failed"] = report["epsilon_lower_bound"] > report["epsilon_claimed"]
    client.set_tag(run.info.run_id, "audit.verdict", "failed" if report["failed"] else "passed")
    for mode in AUDITORS:
        client.log_metric(run.info.run_id, f"audit/{mode}_epsilon_lower_bound",
                          report[mode]["epsilon_lower_bound"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinical-fl-audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for clinical-fl")
    parser.add_argument("--canaries", type=int, default=500,
                        help="canaries of each kind (note, gradient); default 500")
    parser.add_argument("--guesses", default="25,50,100,200",
                        help="k values: guess k in and k out (Bonferroni over the list)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="that both bounds hold together (each at 1 - (1 - c) / 2)")
    parser.add_argument("--out", type=Path, default=Path("audit-report.json"))
    parser.add_argument("--work-dir", type=Path, help="keep canaries and updates here")
    args = parser.parse_args(argv)
    try:
        guesses = [int(k) for k in args.guesses.split(",")]
    except ValueError:
        parser.error(f"--guesses must be integers separated by commas, got {args.guesses!r}")
    if args.canaries < 2 or not all(k >= 1 for k in guesses) or not 0 < args.confidence < 1:
        parser.error("need --canaries >= 2, every k >= 1 and 0 < --confidence < 1")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            report = run_audit(args.overrides, args.canaries, guesses, args.confidence, work,
                               os.environ.get("CLINICAL_FL_FEDERATION_CONFIG"))
        except (ConfigError, RuntimeError, FileNotFoundError) as err:
            print(f"clinical-fl-audit: {err}", file=sys.stderr)
            return 1
    args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    for mode in AUDITORS:
        part = report[mode]
        seen = f" ({part['view']})" if "view" in part else ""
        print(f"{mode}{seen}: epsilon >= {part['epsilon_lower_bound']:.3f} ({part['correct']} of "
              f"{part['guesses']} guesses right, {part['canaries']} canaries)")
    print(f"both bounds hold together at confidence {report['confidence']:g} (each at "
          f"{report['white_box']['confidence']:g}, Bonferroni)")
    print(f"claimed epsilon {report['epsilon_claimed']:.4g} at delta {report['delta']:.3g} "
          f"({report['privacy']}); report {args.out}")
    if report["failed"]:
        print("AUDIT FAILED: the lower bound exceeds the claimed epsilon", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
