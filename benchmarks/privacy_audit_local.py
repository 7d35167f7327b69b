"""The hospital-local white-box audit at several claims, and the injected-bug table.

    .venv/bin/python benchmarks/privacy_audit_local.py --epsilons 1,2,4,8 --canaries 20000 \
        --json audit-local.json
    .venv/bin/python benchmarks/privacy_audit_local.py --bugs --json audit-bugs.json

Each line: mechanism, claimed epsilon, the one-run bound (the better of counting and Gaussian
f-DP, with the guesses behind it), the measured-noise bound, the ceiling of the one-run
bound (every guess right at the k that gave it), and the audit's seconds. ``--bugs`` runs
the four injections of tests/audit_injections.py at a claimed epsilon of 1, each beside the
correct code under the same audit. Hydra overrides after the options choose model and data
(default: the product's model, the built-in synthetic notes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' injections

from clinical_fl.settings.privacy import Accountant, DpSgdSettings  # noqa: E402
from fl_app.commands.local_audit import run_local_audit  # noqa: E402
from tasks.audit import gaussian_bound  # noqa: E402
from tasks.audit.local import LocalAudit  # noqa: E402
from tests.audit_injections import INJECTIONS  # noqa: E402


def _ceiling(report: dict) -> float:
    """The one-run bound had every guess of its best try been right."""
    best = max((t for t in report["tried"] if "guesses" in t),
               key=lambda t: t["epsilon_lower_bound"])
    return gaussian_bound.epsilon_lower_bound(report["canaries"], best["guesses"],
                                              best["guesses"], report["delta"],
                                              report["confidence_each"])


def _line(name: str, report: dict, seconds: float) -> dict:
    one_run = max((t for t in report["tried"] if "guesses" in t),
                  key=lambda t: t["epsilon_lower_bound"])
    row = {"case": name, "mechanism": report["mechanism"],
           "claimed": report["epsilon_claimed"],
           "one_run": report["one_run_epsilon_lower_bound"],
           "one_run_from": f"{one_run['score']}/{one_run['analysis']} "
                           f"{one_run['correct']}/{one_run['guesses']}",
           "measured_noise": report["measured_noise"]["epsilon_lower_bound"],
           "noise_claimed": report["noise_multiplier"],
           "noise_measured": report["measured_noise"]["noise_multiplier"],
           "ceiling": _ceiling(report), "failed": report["failed"], "seconds": seconds,
           "steps": report["steps"], "sample_rate": report["sample_rate"],
           "canaries": report["canaries"]}
    print(f"| {name} | {row['mechanism']} | {row['claimed']:.3f} | {row['one_run']:.3f} "
          f"({row['one_run_from']}) | {row['ceiling']:.2f} | {row['measured_noise']:.3f} "
          f"| {'FAILED' if row['failed'] else 'passed'} | {seconds:.0f} |", flush=True)
    return row


def _run(name: str, audit: LocalAudit, overrides: list[str],
         injection: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict:
    start = time.perf_counter()
    with injection() if injection else contextlib.nullcontext():
        report = run_local_audit(audit, overrides)
    return _line(name, report, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--epsilons", default="1,2,4,8")
    parser.add_argument("--mechanisms", default="dp_sgd,distributed_dp")
    parser.add_argument("--canaries", type=int, default=20000)
    parser.add_argument("--sample-rate", type=float, default=0.02)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--accountant", default=DpSgdSettings().accountant.value)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--bugs", action="store_true", help="the injected-bug table at 1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    base = LocalAudit(mechanism="dp_sgd", target_epsilon=1.0, canaries=args.canaries,
                      sample_rate=args.sample_rate, epochs=args.epochs, rounds=args.rounds,
                      accountant=Accountant(args.accountant), confidence=args.confidence)
    print("| case | mechanism | claimed | one-run bound (from) | one-run ceiling | "
          "measured-noise bound | verdict | seconds |\n|---|---|---|---|---|---|---|---|")
    rows = []
    if args.bugs:
        for name, (injection, mechanism) in INJECTIONS.items():
            audit = replace(base, mechanism=mechanism)
            rows.append(_run("correct", audit, args.overrides))
            rows.append(_run(name, audit, args.overrides, injection))
    else:
        for mechanism in args.mechanisms.split(","):
            for epsilon in (float(e) for e in args.epsilons.split(",")):
                audit = replace(base, mechanism=mechanism, target_epsilon=epsilon)
                rows.append(_run(f"epsilon {epsilon:g}", audit, args.overrides))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
