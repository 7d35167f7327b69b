"""OHSUMED 5-class benchmark: centralized vs federated vs federated DP-SGD, on real text.

    .venv/bin/python benchmarks/ohsumed_prepare.py --source ../shared/data/ohsumed
    .venv/bin/python benchmarks/ohsumed_benchmark.py                  # all parts, resumable
    .venv/bin/python benchmarks/ohsumed_benchmark.py --only federated  # one part
    .venv/bin/python benchmarks/ohsumed_benchmark.py --report          # table only
    .venv/bin/python benchmarks/ohsumed_benchmark.py --variant head3e-2 \
        --set train.head_learning_rate=3e-2 --only dp_eps8             # a variant of a part
    .venv/bin/python benchmarks/ohsumed_tfidf.py --view single23 --prepare-only
    .venv/bin/python benchmarks/ohsumed_benchmark.py --view single23   # the 23-class view

``--view single23`` runs the same parts on the single-label 23-class view
(``label_single23``, same eight case-mix hospitals; its table is written by
ohsumed_tfidf.py) and logs them to the MLflow experiment
``ohsumed-benchmark-single23``, so they never meet the 5-class runs of the
same names.

Each part is one real ``clinical-fl`` run (a Flower simulation) logged to the
MLflow experiment ``ohsumed-benchmark`` under the part's name. A part whose
run already FINISHED is skipped, so an interrupted benchmark resumes where it
stopped. Scores are on the official test split (3,689 documents), held by the
server; every run makes the same number of passes over the training documents.

- centralized: one hospital holding all 3,066 training documents
- federated: eight case-mix hospitals (H1-H8, see ohsumed_prepare.py)
- dp_eps1 / dp_eps3 / dp_eps8: federated with record-level DP-SGD at that epsilon
- distributed_dp_eps8: federated distributed DP-SGD over SecAgg+ (one DP-SGD step a round
  over the union's Poisson batch, one shared noise), epsilon 8 per hospital; its own number
  of rounds (--distributed-rounds), evaluated every --evaluate-every rounds
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.tracking.paths import project_root
from clinical_fl.tracking.run_tracker import resolve_store

EXPERIMENT = "ohsumed-benchmark"
DEFAULT_TABLE = Path("~/.cache/clinical-fl/ohsumed_ma5.parquet")
# view -> (MLflow experiment, default table, how the table is made)
VIEWS = {
    "ma5": (EXPERIMENT, DEFAULT_TABLE, "benchmarks/ohsumed_prepare.py"),
    "single23": ("ohsumed-benchmark-single23",
                 Path("~/.cache/clinical-fl/ohsumed_single23.parquet"),
                 "benchmarks/ohsumed_tfidf.py --view single23 --prepare-only"),
}


def parts(table: Path, rounds: int, max_length: int, extra: list[str] | None = None,
          variant: str = "", distributed_rounds: int = 100, evaluate_every: int = 25,
          experiment: str = EXPERIMENT) -> dict[str, tuple[list[str], int]]:
    """name -> (Hydra overrides, hospitals). A variant adds overrides and names its parts
    ``<part>+<variant>``, so they sit beside the plain parts in MLflow and the table."""
    # Pinned to the settings the recorded table was measured with (notes cut at max_length,
    # before long notes were read whole, unweighted, every round); a variant's --set wins
    # (later overrides win): --set train.class_weighting=balanced early_stopping.enabled=null
    # gives the product's defaults since issue 31.
    common = ["train.head_learning_rate=null", "model.long_notes=truncate",
              "train.class_weighting=none", "early_stopping.enabled=false",
        "data=files", f"data.path={table}", "data.site_column=site", "data.split_column=split",
        "data.test_split=test", "train.local_epochs=1",
        f"model.max_length={max_length}", f"tracking.experiment={experiment}",
    ]
    natural = [*common, "data.partitioning=natural", "strategy.min_hospitals=8"]
    federated = [*natural, f"num_rounds={rounds}"]
    runs = {
        "centralized": ([*common, f"num_rounds={rounds}", "data.partitioning=iid",
                         "strategy.min_hospitals=1"], 1),
        "federated": (federated, 8),
        "distributed_dp_eps8": ([
            *natural, f"num_rounds={distributed_rounds}", f"evaluate_every={evaluate_every}",
            "privacy=distributed_dp", "secure_aggregation=secagg_plus",
            "privacy.distributed_dp.target_epsilon=8"], 8),
    }
    for epsilon in (1, 3, 8):
        runs[f"dp_eps{epsilon}"] = (
            [*federated, "privacy=dp_sgd", f"privacy.dp_sgd.target_epsilon={epsilon}"], 8)
    named = {(f"{name}+{variant}" if variant else name): spec for name, spec in runs.items()}
    # The variant's overrides last: they win over every pin above (local epochs and the
    # window too).
    return {name: ([*o, *(extra or []), f"tracking.run_name={name}"], n)
            for name, (o, n) in named.items()}


def finished(client: MlflowClient, name: str, experiment_name: str = EXPERIMENT) -> str | None:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.mlflow.runName = '{name}' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def run_part(overrides: list[str], hospitals: int) -> int:
    env = {**os.environ, "CLINICAL_FL_FEDERATION_CONFIG": f"num-supernodes={hospitals}"}
    command = [str(Path(sys.executable).with_name("clinical-fl")), *overrides]
    print("+", " ".join(command), flush=True)
    return subprocess.call(command, env=env)


def _last(client: MlflowClient, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: m.step).value if history else None


def _total(client: MlflowClient, run_id: str, key: str) -> float:
    return sum(m.value for m in client.get_metric_history(run_id, key))


def report(client: MlflowClient, names: list[str], experiment: str = EXPERIMENT) -> str:
    lines = ["| run | test accuracy | test macro-F1 | epsilon spent (max over hospitals) | "
             "rounds | wall minutes | MB sent | MB received | MLflow run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        run_id = finished(client, name, experiment)
        if run_id is None:
            lines.append(f"| {name} | not run yet | | | | | | | |")
            continue
        run = client.get_run(run_id)
        epsilon = _last(client, run_id, "privacy/epsilon_max")
        accuracy = _last(client, run_id, "central/accuracy")
        macro_f1 = _last(client, run_id, "central/macro_f1")
        rounds = max((m.step for m in client.get_metric_history(run_id, "round/seconds")),
                     default=0)
        minutes = (run.info.end_time - run.info.start_time) / 60_000
        lines.append(
            f"| {name} | {accuracy:.3f} | {macro_f1:.3f} | "
            f"{'-' if epsilon is None or math.isinf(epsilon) else f'{epsilon:.3f}'} | "
            f"{rounds} | {minutes:.1f} | {_total(client, run_id, 'comm/bytes_sent') / 1e6:.1f} | "
            f"{_total(client, run_id, 'comm/bytes_received') / 1e6:.1f} | {run_id[:8]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--view", choices=sorted(VIEWS), default="ma5",
                        help="ma5: the 5-class view; single23: the 23-class single-label view "
                             "(its own MLflow experiment and table)")
    parser.add_argument("--table", type=Path, default=None,
                        help="the prepared table (default: the view's, under ~/.cache)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--distributed-rounds", type=int, default=100,
                        help="rounds of the distributed DP part (one DP-SGD step each)")
    parser.add_argument("--evaluate-every", type=int, default=25,
                        help="the distributed DP part is scored every this many rounds")
    parser.add_argument("--only", nargs="*", help="run only these parts")
    parser.add_argument("--report", action="store_true", help="print the table, run nothing")
    parser.add_argument("--variant", default="", help="name of a variant of the parts")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of the variant (needs --variant)")
    args = parser.parse_args()
    experiment, default_table, how = VIEWS[args.view]
    table = (args.table or default_table).expanduser()
    if not table.is_file():
        sys.exit(f"{table}: not found; run {how} first")
    if args.set and not args.variant:
        parser.error("--set changes the runs: name them with --variant")
    plan = parts(table, args.rounds, args.max_length, args.set, args.variant,
                 args.distributed_rounds, args.evaluate_every, experiment)
    client = MlflowClient(tracking_uri=resolve_store(TrackingSettings(), project_root())[0])
    if not args.report:
        # Most informative first, so an interrupted sitting still yields the key comparisons.
        order = ["federated", "dp_eps8", "distributed_dp_eps8", "centralized", "dp_eps3",
                 "dp_eps1"]
        for name in sorted(plan, key=lambda n: order.index(n.split("+")[0])):
            overrides, hospitals = plan[name]
            if args.only and name.split("+")[0] not in args.only:
                continue
            if finished(client, name, experiment):
                print(f"{name}: already finished in MLflow, skipped")
                continue
            if run_part(overrides, hospitals) != 0:
                print(f"{name}: failed; rerun this script to retry it", file=sys.stderr)
    print(report(client, [*parts(table, args.rounds, args.max_length,
                                 distributed_rounds=args.distributed_rounds), *(
        [n for n in plan if not args.only or n.split("+")[0] in args.only]
        if args.variant else [])], experiment))


if __name__ == "__main__":
    main()
