"""Quick look at DP-SGD against non-private training under other training settings, without
process start-up: the product's hospitals (``Hospital.train`` / ``Hospital.evaluate``) for 2
hospitals in one process, their replies aggregated by the product's strategy (Flower's FedAvg,
benchmarks/flower_aggregation.py), 4 rounds, federated accuracy on the hospitals' held-out notes
at the end.

    .venv/bin/python benchmarks/dp_hyperparameters.py --local-epochs 1
    .venv/bin/python benchmarks/dp_hyperparameters.py --batch-size 64 --learning-rate 5e-3
    .venv/bin/python benchmarks/dp_hyperparameters.py --lora-r 2 --epsilon 3 --no-baseline
    .venv/bin/python benchmarks/dp_hyperparameters.py --set data.notes_per_hospital=1200

Settings are composed as the product composes them (``conf/`` + overrides): the private run
uses the ``privacy=dp_sgd`` preset (epsilon 8, 3 local epochs), the non-private one the
defaults (1 local epoch); an option given here applies to both. Numbers from a real
``flwr run`` are in MLflow; this is for scanning settings faster (no evaluation rounds in
between). One DP run per setting: DP results vary from run to run (fresh noise), so read
single numbers with care.
"""

from __future__ import annotations

import argparse
import time

from composed_settings import Composed, compose
from flower_aggregation import ServerAggregation

from clinical_fl.settings.train import OptimizerName
from tasks.hospital import Hospital
from tasks.model.build import trainable_state
from tasks.privacy.ledger import PrivacyLedger


def federated_accuracy(composed: Composed, hospitals: int) -> tuple[float, float | None]:
    """(federated accuracy after the last round, the largest epsilon a hospital spent)."""
    settings = composed.task
    members = [Hospital(settings, composed.labels, k, hospitals) for k in range(hospitals)]
    ledgers = [PrivacyLedger(run_id=0, hospital=k) for k in range(hospitals)]
    server = ServerAggregation(composed.run.strategy)
    state = trainable_state(members[0].model)
    epsilon = None
    for server_round in range(1, composed.run.num_rounds + 1):
        results = []
        for k, (hospital, ledger) in enumerate(zip(members, ledgers, strict=True)):
            new, outcome = hospital.train(state, server_round,
                                          ledger=ledger if hospital.is_private else None)
            results.append((k, new, outcome))
            if outcome.privacy is not None:
                epsilon = max(epsilon or 0.0, outcome.privacy.epsilon)
        state = server.aggregate(server_round, results)
    scores = [h.evaluate(state) for h in members]
    accuracy = sum(s.accuracy * s.num_examples for s in scores) / sum(s.num_examples
                                                                      for s in scores)
    return accuracy, epsilon


def _overrides(args: argparse.Namespace, private: bool) -> list[str]:
    given = {
        "num_rounds": args.rounds, "data.notes_per_hospital": args.notes_per_hospital,
        "train.batch_size": args.batch_size, "train.learning_rate": args.learning_rate,
        "train.head_learning_rate": args.head_learning_rate, "train.optimizer": args.optimizer,
        "train.local_epochs": args.local_epochs, "train.num_threads": args.num_threads,
        "model.lora.r": args.lora_r, "model.lora.alpha": args.lora_alpha,
    }
    if private:
        given.update({"privacy.dp_sgd.target_epsilon": args.epsilon,
                      "privacy.dp_sgd.max_grad_norm": args.max_grad_norm})
    overrides = ["privacy=dp_sgd"] if private else []
    overrides += [f"{key}={value}" for key, value in given.items() if value is not None]
    return overrides + list(args.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=2)
    # Unset options keep the product's value (the dataclass default, or the preset's).
    parser.add_argument("--epsilon", type=float, help="privacy.dp_sgd.target_epsilon")
    parser.add_argument("--rounds", type=int, help="num_rounds")
    parser.add_argument("--notes-per-hospital", type=int, help="data.notes_per_hospital")
    parser.add_argument("--batch-size", type=int, help="train.batch_size")
    parser.add_argument("--learning-rate", type=float, help="train.learning_rate (LoRA)")
    parser.add_argument("--head-learning-rate", help="train.head_learning_rate "
                        "(null: the LoRA rate for the head too)")
    parser.add_argument("--optimizer", choices=[o.value for o in OptimizerName])
    parser.add_argument("--local-epochs", type=int, help="train.local_epochs")
    parser.add_argument("--lora-r", type=int, help="model.lora.r")
    parser.add_argument("--lora-alpha", type=int,
                        help="model.lora.alpha; LoRA scaling is alpha / r: it sets the LoRA "
                             "gradients' size against the head's, and so their share of each "
                             "clipped record")
    parser.add_argument("--num-threads", type=int,
                        help="train.num_threads (torch threads); 1 lets two runs share 2 cores")
    parser.add_argument("--max-grad-norm", type=float, help="privacy.dp_sgd.max_grad_norm")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="any other Hydra override, applied to both runs")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    parser.add_argument("--baseline-only", action="store_true", help="only the non-private run")
    args = parser.parse_args()

    plan = (False,) if args.baseline_only else (True,) if args.no_baseline else (True, False)
    for private in plan:
        composed = compose(_overrides(args, private), args.hospitals)
        task = composed.task
        train, lora, dp = task.train, task.model.lora, task.privacy.dp_sgd
        began = time.perf_counter()
        accuracy, epsilon = federated_accuracy(composed, args.hospitals)
        private = task.privacy.record_level
        label = f"DP-SGD epsilon={dp.target_epsilon:g}" if private else "non-private"
        spent = f", spent {epsilon:.3f}" if epsilon is not None else ""
        print(f"{label:<22} accuracy {accuracy:.3f}   ({time.perf_counter() - began:.0f} s)  "
              f"{train.optimizer.value}, batch {train.batch_size}, lr {train.learning_rate:g}, "
              f"head lr {train.head_learning_rate or train.learning_rate:g}, "
              f"r {lora.r}, alpha {lora.alpha}, epochs {train.local_epochs}, "
              f"rounds {composed.run.num_rounds}"
              + (f", clip {dp.max_grad_norm:g}{spent}" if private else "")
              + f", {task.data.notes_per_hospital} notes/hospital", flush=True)


if __name__ == "__main__":
    main()
