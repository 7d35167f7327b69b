"""Why DP-SGD at epsilon 8 stays far from non-private on the default data: the head alone.

Two measurements behind docs/benchmarks.md ("What limits DP-SGD here"):

1. Per-record gradient norms of the production model (MiniLM + LoRA + head, mean pooling) at
   the start of training, split into head and LoRA parts: how the clipping norm is shared.
2. A federated linear probe: the encoder frozen (no LoRA), each note's pooled vector computed
   once by the production model, and only a copy of the production classification head
   trained, for several local-epoch counts and head learning rates. Everything else is the
   product's: the settings composed from ``conf/`` (``privacy=dp_sgd`` at each epsilon), each
   hospital's DP-SGD plan (``tasks/privacy/mechanisms/dp_sgd.py::DpSgd.plan``: sampling rate,
   the hospital's own delta, noise calibrated for all planned rounds by
   ``tasks/privacy/accounting.py``), its privacy ledger and refusal check, training by
   ``tasks/privacy/dp_sgd.py::train_with_dp_sgd``
   (Opacus: Poisson sampling, per-record clipping, noise; the product's AdamW at
   ``train.head_learning_rate``) or, without DP, ``tasks/learning/training.py::train_locally``,
   and the replies aggregated by the product's strategy (Flower's FedAvg). It bounds what DP
   can reach when the LoRA part learns nothing, which is what the product measurements show
   at this size; a setting takes seconds instead of an hour.

    .venv/bin/python benchmarks/dp_head_probe.py                  # 300 notes, 1/3/8 epochs
    .venv/bin/python benchmarks/dp_head_probe.py --notes-per-hospital 300 1200 --epochs 1
    .venv/bin/python benchmarks/dp_head_probe.py --epochs 3 --learning-rates 3e-2 --seeds 8

Accuracy is on the hospitals' held-out notes, mean over seeds (the seed drives the
non-private batches; DP-SGD's sampling and noise come from OS entropy, fresh every run).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch
from composed_settings import Composed, compose
from flower_aggregation import ServerAggregation
from torch.utils.data import DataLoader
from transformers.modeling_outputs import SequenceClassifierOutput

from tasks.hospital import Hospital, privacy_report
from tasks.learning.batches import make_loader
from tasks.learning.training import TrainOutcome, train_locally
from tasks.privacy.dp_sgd import train_with_dp_sgd
from tasks.privacy.ledger import PrivacyLedger
from tasks.privacy.plan import PrivacyBudgetError

HOSPITALS = 2
EPSILONS = (math.inf, 8.0, 3.0)


def _head(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head PEFT trains (``modules_to_save``) in the production model."""
    return next(module for name, module in model.named_modules()
                if name.endswith("classifier.modules_to_save.default"))


class PooledHead(torch.nn.Module):
    """A copy of the production head over precomputed pooled vectors, called like the
    production model (keyword inputs, ``labels`` optional, an output with ``logits``/``loss``),
    so the product's training functions take it as they take the model."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = copy.deepcopy(head)

    def forward(self, pooled: torch.Tensor,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.classifier(pooled)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def gradient_norms(hospital: Hospital, records: int = 40) -> dict[str, list[float]]:
    """Per-record gradient norms of the head and of the LoRA matrices, untrained adapter."""
    model = hospital.model
    model.eval()  # dropout off: the norms of the function DP-SGD clips
    norms: dict[str, list[float]] = {"head": [], "lora": [], "all": []}
    for index, batch in enumerate(make_loader(hospital.train_records, hospital.tokenizer, 1,
                                              shuffle=False)):
        if index == records:
            break
        model.zero_grad()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        parts = {"head": 0.0, "lora": 0.0}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                parts["lora" if "lora_" in name else "head"] += float(parameter.grad.pow(2).sum())
        for part, squared in parts.items():
            norms[part].append(math.sqrt(squared))
        norms["all"].append(math.sqrt(sum(parts.values())))
    model.zero_grad()
    return norms


def pooled_records(hospital: Hospital) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The hospital's train and held-out notes as (vector the head reads, label) records."""
    captured: list[torch.Tensor] = []
    hook = _head(hospital.model).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach()))
    hospital.model.eval()
    out = {}
    try:
        for split, records in (("train", hospital.train_records),
                               ("eval", hospital.eval_records)):
            captured.clear()
            labels = []
            with torch.no_grad():
                for batch in make_loader(records, hospital.tokenizer, 64, shuffle=False):
                    hospital.model(**{k: v for k, v in batch.items() if k != "labels"})
                    labels.append(batch["labels"])
            out[split] = [{"pooled": x, "labels": y}
                          for x, y in zip(torch.cat(captured), torch.cat(labels), strict=True)]
    finally:
        hook.remove()
    return out


def _local_training(hospital: Hospital, probe: PooledHead, records: list[dict],
                    ledger: PrivacyLedger, server_round: int, seed: int) -> TrainOutcome:
    """One hospital's round on the probe, by the product's training functions."""
    settings = hospital.settings
    loader = DataLoader(records, batch_size=settings.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed * 1_009 + server_round))
    if not hospital.is_private:
        torch.manual_seed(seed)
        return train_locally(probe, loader, settings.train)
    # calibrated once, then the ledger's noise
    plan = hospital.privacy.plan(settings, hospital.data.hospital, len(hospital.data.train),
                                 ledger=ledger)
    refusal = plan.refusal(ledger.history, server_round)
    if refusal:
        raise PrivacyBudgetError(refusal)
    ledger.noise_multiplier, ledger.delta = plan.noise_multiplier, plan.delta
    outcome = train_with_dp_sgd(probe, loader, settings.train, plan.noise_multiplier,
                                plan.max_grad_norm, settings.privacy.dp_sgd.grad_sample_mode,
                                ledger.history)
    ledger.rounds_trained.append(server_round)
    outcome.privacy = privacy_report(plan, ledger)
    return outcome


def federated_probe(composed: Composed, data: list[dict], head: torch.nn.Module,
                    seed: int) -> tuple[float, float | None, float | None]:
    """(held-out accuracy, largest epsilon spent, noise multiplier) of the head trained by the
    product's FedAvg over ``data`` (one dict of pooled records per hospital)."""
    settings = composed.task
    members = [Hospital(settings, composed.labels, k, HOSPITALS) for k in range(HOSPITALS)]
    ledgers = [PrivacyLedger(run_id=0, hospital=k) for k in range(HOSPITALS)]
    server = ServerAggregation(composed.run.strategy)
    probe = PooledHead(head)
    state = {k: v.detach().clone() for k, v in probe.state_dict().items()}
    epsilon = noise = None
    for server_round in range(1, composed.run.num_rounds + 1):
        results = []
        for k, (hospital, ledger) in enumerate(zip(members, ledgers, strict=True)):
            probe.load_state_dict(state)
            outcome = _local_training(hospital, probe, data[k]["train"], ledger, server_round,
                                      seed)
            if outcome.privacy is not None:
                epsilon = max(epsilon or 0.0, outcome.privacy.epsilon)
                noise = outcome.privacy.noise_multiplier
            results.append((k, {n: p.detach().clone() for n, p in probe.state_dict().items()},
                            outcome))
        state = server.aggregate(server_round, results)
    probe.load_state_dict(state)
    probe.eval()
    correct = total = 0
    with torch.no_grad():
        for hospital_data in data:
            batch = torch.utils.data.default_collate(hospital_data["eval"])
            correct += int((probe(batch["pooled"]).logits.argmax(1) == batch["labels"]).sum())
            total += len(hospital_data["eval"])
    return correct / total, epsilon, noise


def _setting(notes: int, epochs: int, learning_rate: float, epsilon: float,
             batch_size: int | None) -> Composed:
    overrides = [f"data.notes_per_hospital={notes}", f"train.local_epochs={epochs}",
                 f"train.head_learning_rate={learning_rate}"]
    if batch_size is not None:
        overrides.append(f"train.batch_size={batch_size}")
    if not math.isinf(epsilon):
        overrides += ["privacy=dp_sgd", f"privacy.dp_sgd.target_epsilon={epsilon}"]
    return compose(overrides, HOSPITALS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notes-per-hospital", type=int, nargs="+", default=[300])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 8],
                        help="local epochs per round (4 rounds)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-2, 3e-2],
                        help="train.head_learning_rate values")
    parser.add_argument("--batch-size", type=int, help="train.batch_size (default: product's)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    for notes in args.notes_per_hospital:
        base = _setting(notes, 1, args.learning_rates[0], math.inf, args.batch_size)
        members = [Hospital(base.task, base.labels, k, HOSPITALS) for k in range(HOSPITALS)]
        if notes == args.notes_per_hospital[0]:
            clip = _setting(notes, 1, args.learning_rates[0], 8.0, None).task.privacy.dp_sgd
            norms = gradient_norms(members[0])
            print(f"per-record gradient norm at the start (40 records of hospital 0, "
                  f"clipping {clip.max_grad_norm:g}):")
            for part, values in norms.items():
                print(f"  {part:<5} median {statistics.median(values):.3f}  "
                      f"min {min(values):.3f}  max {max(values):.3f}")
        data = [pooled_records(h) for h in members]
        head = _head(members[0].model)
        train = base.task.train
        print(f"\nlinear probe, {len(data[0]['train'])} / {len(data[1]['train'])} training "
              f"notes, {HOSPITALS} hospitals, {base.run.num_rounds} rounds, batch "
              f"{train.batch_size}, product AdamW (weight decay {train.weight_decay:g}); "
              "DP-SGD from the privacy=dp_sgd preset, noise calibrated by the product")
        print("| local epochs | head learning rate | non-private | epsilon 8 | epsilon 3 |")
        print("|---|---|---|---|---|")
        notes_on_privacy = []
        for epochs in args.epochs:
            for lr in args.learning_rates:
                row = []
                for epsilon in EPSILONS:
                    composed = _setting(notes, epochs, lr, epsilon, args.batch_size)
                    runs = [federated_probe(composed, data, head, seed)
                            for seed in range(args.seeds)]
                    row.append(statistics.mean(accuracy for accuracy, _, _ in runs))
                    if runs[0][1] is not None:
                        notes_on_privacy.append(
                            f"epochs {epochs}, lr {lr:g}, target {epsilon:g}: noise multiplier "
                            f"{runs[0][2]:.3f}, epsilon spent {max(r[1] for r in runs):.3f}")
                print(f"| {epochs} | {lr:g} | " + " | ".join(f"{a:.3f}" for a in row) + " |",
                      flush=True)
        print("\n" + "\n".join(notes_on_privacy))


if __name__ == "__main__":
    main()
