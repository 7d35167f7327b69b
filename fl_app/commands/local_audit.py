"""``clinical-fl-audit-local``: the hospital-local white-box audit of the product's DP-SGD or its
distributed-DP share (tasks/audit/local.py), where a hospital's code runs.

    clinical-fl-audit-local --epsilon 1                         # DP-SGD, 1,000 canaries
    clinical-fl-audit-local --mechanism distributed_dp --epsilon 2 --canaries 4000
    clinical-fl-audit-local --epsilon 4 --out audit.json model.name_or_path=/path/to/model

The adversary is the one the accountant assumes: it sees every noisy step. m Dirac
canaries (each its own trainable coordinate) sit among hospital 0's training notes, each
in with probability 1/2; training runs once with the product's own code; the bound is the
largest of the one-run bounds (counting and Gaussian f-DP) and the measured-noise bound, all
holding together at --confidence. Exit code 3 and the MLflow tag ``audit.verdict=failed``
when the bound is above the claimed epsilon (a bug in the privacy machinery); 0 and
``passed`` otherwise. Hydra overrides choose the model and the notes (model.*, data.*,
train.optimizer and learning rates); the audit's own options set its privacy and size.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import uuid
from pathlib import Path

from mlflow.tracking import MlflowClient

from clinical_fl.settings.compose import ConfigError, compose_config, to_run_settings
from clinical_fl.settings.privacy import Accountant, DpSgdSettings
from clinical_fl.tracking.paths import project_root
from clinical_fl.tracking.run_tracker import resolve_store
from fl_app.server.data_check import checked_labels
from tasks.audit.local import DISTRIBUTED_DP, DP_SGD, LocalAudit, audit_distributed_dp, audit_dp_sgd
from tasks.data.hospital_data import load_hospital_data
from tasks.errors import TaskInputError
from tasks.model.build import build_model, load_tokenizer

EXPERIMENT = "clinical-fl-audit"
FAILED = 3


def run_local_audit(audit: LocalAudit, overrides: list[str]) -> dict:
    settings = to_run_settings(compose_config(overrides))  # a bad override fails here
    labels = checked_labels(settings.data, hospitals_read_here=True)
    data = load_hospital_data(settings.data, labels, 0, 2)
    tokenizer = load_tokenizer(settings.model)
    model = build_model(settings.model, labels, settings.seed, tokenizer)
    if audit.mechanism == DP_SGD:
        return audit_dp_sgd(model, tokenizer, data.train, len(labels), settings.train, audit)
    return audit_distributed_dp(model, tokenizer, data.train, len(labels), audit)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 1e300  # MLflow refuses infinities


def log_to_mlflow(report: dict, overrides: list[str]) -> str:
    """The report as an MLflow run of the audit experiment: its bounds, claim and verdict."""
    settings = to_run_settings(compose_config(overrides))
    uri, artifacts = resolve_store(settings.tracking, project_root())
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(
        EXPERIMENT, artifact_location=artifacts)
    run = client.create_run(experiment, run_name=f"local-audit-{uuid.uuid4().hex[:8]}", tags={
        "audit.kind": "local_white_box", "audit.mechanism": report["mechanism"],
        "audit.verdict": "failed" if report["failed"] else "passed"})
    run_id = run.info.run_id
    for key in ("target_epsilon", "noise_multiplier", "sample_rate", "steps", "canaries",
                "records", "accountant", "confidence", "delta"):
        client.log_param(run_id, key, report[key])
    client.log_metric(run_id, "audit/epsilon_claimed", _finite(report["epsilon_claimed"]))
    client.log_metric(run_id, "audit/local_white_box_epsilon_lower_bound",
                      _finite(report["epsilon_lower_bound"]))
    client.log_metric(run_id, "audit/one_run_epsilon_lower_bound",
                      _finite(report["one_run_epsilon_lower_bound"]))
    client.log_metric(run_id, "audit/measured_noise_epsilon_lower_bound",
                      _finite(report["measured_noise"]["epsilon_lower_bound"]))
    client.log_dict(run_id, report, "audit/report.json")
    client.set_terminated(run_id)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinical-fl-audit-local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (model.*, data.*, train.*)")
    parser.add_argument("--mechanism", choices=(DP_SGD, DISTRIBUTED_DP), default=DP_SGD)
    parser.add_argument("--epsilon", type=float, default=1.0, help="the claim audited")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--sample-rate", type=float, default=0.02)
    parser.add_argument("--epochs", type=int, default=2, help="DP-SGD")
    parser.add_argument("--rounds", type=int, default=40, help="distributed DP")
    parser.add_argument("--threshold", type=int, default=3, help="distributed DP")
    parser.add_argument("--accountant", choices=[a.value for a in Accountant],
                        default=DpSgdSettings().accountant.value)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=Path("local-audit-report.json"))
    args = parser.parse_args(argv)
    try:
        audit = LocalAudit(
            mechanism=args.mechanism, target_epsilon=args.epsilon, delta=args.delta,
            canaries=args.canaries, sample_rate=args.sample_rate, epochs=args.epochs,
            rounds=args.rounds, threshold=args.threshold,
            accountant=Accountant(args.accountant), confidence=args.confidence)
        report = run_local_audit(audit, args.overrides)
        report["mlflow_run_id"] = log_to_mlflow(report, args.overrides)
    except (ConfigError, TaskInputError, ValueError) as err:
        print(f"clinical-fl-audit-local: {err}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    noise = report["measured_noise"]
    print(f"{report['mechanism']}: claimed epsilon {report['epsilon_claimed']:.3f} at delta "
          f"{report['delta']:g} ({report['steps']} steps at q {report['sample_rate']:.4g}, "
          f"noise {report['noise_multiplier']:.3f}); {report['canaries']} canaries")
    print(f"one-run bound {report['one_run_epsilon_lower_bound']:.3f}; measured noise "
          f"{noise['noise_multiplier']:.3f} (at most {noise['noise_multiplier_upper']:.3f}): "
          f"epsilon >= {noise['epsilon_lower_bound']:.3f}; all at confidence "
          f"{report['confidence']:g}; report {args.out}")
    if report["failed"]:
        print(f"AUDIT FAILED: epsilon >= {report['epsilon_lower_bound']:.3f} "
              f"({report['best']['score']}) above the claim", file=sys.stderr)
        return FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
