"""Quick look at DP-SGD against non-private training under other training settings, without
Flower: the production ``Hospital`` code for 2 hospitals, averaged by record count (what FedAvg
computes), 4 rounds, federated accuracy on the hospitals' held-out notes at the end.

    .venv/bin/python benchmarks/dp_hyperparameters.py --batch-size 64 --learning-rate 5e-3
    .venv/bin/python benchmarks/dp_hyperparameters.py --lora-r 2 --epsilon 8 --no-baseline
    .venv/bin/python benchmarks/dp_hyperparameters.py --head-learning-rate 3e-2

Numbers from a real ``flwr run`` are in MLflow; this is for scanning settings faster (no
process start-up, no evaluation rounds in between). One DP run per setting: DP results vary
from run to run (fresh noise), so read single numbers with care.
"""

from __future__ import annotations

import argparse
import time

from tasks.data.hospital_data import source_labels
from tasks.hospital import Hospital
from tasks.model.build import DEFAULT_MODEL_ID, trainable_state
from tasks.privacy.ledger import PrivacyLedger
from tasks.task_settings import (
    DataSettings,
    DpSgdSettings,
    ModelSettings,
    OptimizerName,
    TaskSettings,
    TrainSettings,
)


def federated_accuracy(settings: TaskSettings, rounds: int, hospitals: int) -> float:
    labels = source_labels(settings.data)
    members = [Hospital(settings, labels, k, hospitals) for k in range(hospitals)]
    ledgers = [PrivacyLedger(run_id=0, hospital=k) for k in range(hospitals)]
    state = trainable_state(members[0].model)
    for server_round in range(1, rounds + 1):
        updates = []
        for hospital, ledger in zip(members, ledgers, strict=True):
            new, _ = hospital.train(state, server_round,
                                    ledger=ledger if hospital.uses_dp_sgd else None)
            updates.append((new, len(hospital.data.train)))
        total = sum(n for _, n in updates)
        state = {k: sum(u[k] * n for u, n in updates) / total for k in state}
    scores = [h.evaluate(state) for h in members]
    return sum(s.accuracy * s.num_examples for s in scores) / sum(s.num_examples for s in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--notes-per-hospital", type=int, default=300)
    parser.add_argument("--hospitals", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--head-learning-rate", type=float, default=None,
                        help="the classification head's own rate (default: --learning-rate)")
    parser.add_argument("--optimizer", choices=[o.value for o in OptimizerName], default="adamw")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16,
                        help="LoRA scaling is alpha / r: it sets the LoRA gradients' size "
                             "against the head's, and so their share of each clipped record")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 lets two runs share 2 cores")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    parser.add_argument("--baseline-only", action="store_true", help="only the non-private run")
    args = parser.parse_args()

    plan = (False,) if args.baseline_only else (True,) if args.no_baseline else (True, False)
    for private in plan:
        settings = TaskSettings(
            model=ModelSettings(name_or_path=DEFAULT_MODEL_ID),
            data=DataSettings(notes_per_hospital=args.notes_per_hospital),
            train=TrainSettings(batch_size=args.batch_size, learning_rate=args.learning_rate,
                                head_learning_rate=args.head_learning_rate,
                                local_epochs=args.local_epochs,
                                num_threads=args.num_threads,
                                optimizer=OptimizerName(args.optimizer)),
            planned_rounds=args.rounds)
        settings.model.lora.r = args.lora_r
        settings.model.lora.alpha = args.lora_alpha
        if private:
            settings.privacy.dp_sgd = DpSgdSettings(enabled=True, target_epsilon=args.epsilon,
                                                    max_grad_norm=args.max_grad_norm)
        began = time.perf_counter()
        accuracy = federated_accuracy(settings, args.rounds, args.hospitals)
        label = f"DP-SGD epsilon={args.epsilon:g}" if private else "non-private"
        print(f"{label:<22} accuracy {accuracy:.3f}   ({time.perf_counter() - began:.0f} s)  "
              f"{args.optimizer}, batch {args.batch_size}, lr {args.learning_rate:g}, "
              f"head lr {args.head_learning_rate or args.learning_rate:g}, "
              f"r {args.lora_r}, alpha {args.lora_alpha}, epochs {args.local_epochs}, "
              f"clip {args.max_grad_norm:g}, "
              f"{args.notes_per_hospital} notes/hospital",
              flush=True)


if __name__ == "__main__":
    main()
