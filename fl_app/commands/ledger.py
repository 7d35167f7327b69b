"""``clinical-fl-ledger STATE_DIR``: what a hospital has spent, run by run and over its lifetime.

    clinical-fl-ledger /var/lib/hospital-a/state
    clinical-fl-ledger STATE_DIR --json
    clinical-fl-ledger STATE_DIR --archive --reason "new patient cohort, approved by the DPO"

The lifetime epsilon is at the hospital's delta: ``--delta``, else ``max-delta``
of the policy file in the state directory, else the smallest delta any run used
(the largest epsilon). It is computed over the whole history with ``--accountant``,
else the accountant the ledger was last written with, whichever accountants booked
its runs (each run lists them); RDP's figure is shown beside it as the cross-check.
Archiving moves the ledger aside and starts a new one whose first event records
what was archived, when and why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clinical_fl.settings.privacy import Accountant
from tasks.errors import TaskInputError
from tasks.privacy.accounting import epsilon_spent
from tasks.privacy.ledger import LEDGER_FILE, LedgerStore, LifetimeLedger
from tasks.privacy.policy import load_policy


def _kept_with(state: Path) -> Accountant:
    path = state / LEDGER_FILE
    if path.exists():
        try:
            return Accountant(json.loads(path.read_text(encoding="utf-8"))["accountant"])
        except (ValueError, KeyError, TypeError):
            pass  # LedgerStore.load names the problem
    return Accountant.pld  # no ledger yet: the default


def _hospital_delta(ledger: LifetimeLedger, state: Path, delta: float | None
                    ) -> tuple[float | None, str]:
    if delta is not None:
        return delta, "--delta"
    policy = load_policy(state, {}, ledger.hospital)
    if policy.max_delta is not None:
        return policy.max_delta, f"max-delta of {policy.source}"
    deltas = [run.delta for run in ledger.runs.values() if run.delta]
    return (min(deltas), "smallest delta of its runs") if deltas else (None, "no runs")


def ledger_report(state: Path, delta: float | None = None,
                  accountant: Accountant | None = None) -> dict:
    """The ledger of the hospital whose state directory is ``state``, with epsilons computed
    with ``accountant`` (default: the one it was last written with), and RDP's lifetime
    figure, the cross-check."""
    ledger = LedgerStore(state).load(0, accountant or _kept_with(state))
    hospital_delta, delta_source = _hospital_delta(ledger, state, delta)
    runs = [{"run_id": run.run_id, "rounds_trained": run.rounds_trained, "steps": run.steps,
             "noise_multiplier": run.noise_multiplier, "delta": run.delta,
             "sample_rates": sorted({q for _, q, _ in run.history}),
             "accountants": run.accountants,
             "run_epsilon": epsilon_spent(run.history, run.delta, ledger.accountant)
             if run.delta else 0.0}
            for _, run in sorted(ledger.runs.items())]
    rdp = epsilon_spent(ledger.history(), hospital_delta, Accountant.rdp) \
        if hospital_delta else 0.0
    return {"state_dir": str(state), "accountant": ledger.accountant.value, "runs": runs,
            "hospital_delta": hospital_delta, "hospital_delta_from": delta_source,
            "lifetime_epsilon": ledger.epsilon(hospital_delta) if hospital_delta else 0.0,
            "lifetime_epsilon_rdp": rdp, "events": ledger.events}


def _print(report: dict) -> None:
    print(f"privacy ledger of {report['state_dir']} (accountant {report['accountant']})")
    print(f"{'run id':>22} {'rounds':>7} {'steps':>6} {'noise':>7} {'delta':>9} "
          f"{'run epsilon':>12}")
    for run in report["runs"]:
        noise = f"{run['noise_multiplier']:.4g}" if run["noise_multiplier"] else "-"
        run_delta = f"{run['delta']:.3g}" if run["delta"] else "-"
        print(f"{run['run_id']:>22} {len(run['rounds_trained']):>7} {run['steps']:>6} "
              f"{noise:>7} {run_delta:>9} {run['run_epsilon']:>12.4f}")
    if report["hospital_delta"]:
        print(f"lifetime epsilon {report['lifetime_epsilon']:.4f} at delta "
              f"{report['hospital_delta']:.3g} ({report['hospital_delta_from']}), "
              f"{len(report['runs'])} run(s)")
        if report["accountant"] != Accountant.rdp.value:
            print(f"  RDP cross-check: {report['lifetime_epsilon_rdp']:.4f} over the same "
                  "steps")
        booked = sorted({name for run in report["runs"] for name in run["accountants"]})
        if booked and booked != [report["accountant"]]:
            print(f"  runs booked with {', '.join(booked)}; every figure above is "
                  f"{report['accountant']}'s over the whole history")
    else:
        print("lifetime epsilon 0 (no private steps recorded)")
    for event in report["events"]:
        print(f"event: {event.get('event')} at {event.get('time')}: {event.get('reason')} "
              f"(lifetime epsilon then {event.get('lifetime_epsilon')}, archived to "
              f"{event.get('archived_to')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinical-fl-ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state_dir", type=Path, help="the hospital's state directory")
    parser.add_argument("--delta", type=float, help="report the lifetime epsilon at this delta")
    parser.add_argument("--accountant", choices=[a.value for a in Accountant],
                        help="compute with this accountant (default: the one the ledger was "
                             "last written with)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--archive", action="store_true",
                        help="move the ledger aside and start a new one (needs --reason)")
    parser.add_argument("--reason", default="", help="why the ledger is archived (recorded)")
    args = parser.parse_args(argv)
    if args.delta is not None and not 0 < args.delta < 1:  # NaN included
        parser.error(f"--delta must be a number in (0, 1), got {args.delta}")
    if not args.state_dir.is_dir():
        print(f"clinical-fl-ledger: {args.state_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        accountant = Accountant(args.accountant) if args.accountant else None
        report = ledger_report(args.state_dir, args.delta, accountant)
        if args.archive:
            target = LedgerStore(args.state_dir).archive(args.reason,
                                                         report["lifetime_epsilon"])
            print(f"archived to {target}; a new ledger starts with that record")
            report = ledger_report(args.state_dir, args.delta, accountant)
    except TaskInputError as err:
        print(f"clinical-fl-ledger: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
