"""Why DP-SGD at epsilon 8 stays far from non-private on the default data: the head alone.

Two measurements behind docs/benchmarks.md ("What limits DP-SGD here"):

1. Per-record gradient norms of the production model (MiniLM + LoRA + head, mean pooling) at
   the start of training, split into head and LoRA parts: how the clipping norm is shared.
2. A federated linear probe under DP-SGD: the encoder frozen (no LoRA), each note's pooled
   vector computed once by the production model, only the head trained, 2 hospitals averaged by
   records, for several hospital sizes. DP-SGD as in the product (Poisson sampling at
   batch / records, per-record clipping, Gaussian noise from Opacus' RDP accountant for the
   whole plan, Adam on the noisy mean gradient). A linear head's per-record gradient is an
   exact outer product, so no Opacus hooks are needed and a setting takes seconds. It bounds
   what DP can reach when the LoRA part learns nothing, which is what the product measurements
   show at this size.

    .venv/bin/python benchmarks/dp_head_probe.py                  # 300 notes, 1/3/8 epochs
    .venv/bin/python benchmarks/dp_head_probe.py --notes-per-hospital 300 1200 --epochs 1
    .venv/bin/python benchmarks/dp_head_probe.py --epochs 3 --learning-rates 3e-2 --ema 0.9

Accuracy is on the hospitals' held-out notes, mean over seeds (fresh noise and batches).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from opacus.accountants.utils import get_noise_multiplier

from tasks.data.hospital_data import source_labels
from tasks.hospital import Hospital
from tasks.learning.batches import make_loader
from tasks.model.build import DEFAULT_MODEL_ID
from tasks.task_settings import DataSettings, ModelSettings, TaskSettings, TrainSettings

HOSPITALS = 2


def _settings(notes_per_hospital: int) -> TaskSettings:
    return TaskSettings(model=ModelSettings(name_or_path=DEFAULT_MODEL_ID),
                        data=DataSettings(notes_per_hospital=notes_per_hospital),
                        train=TrainSettings(), planned_rounds=4)


def _head(model: torch.nn.Module) -> torch.nn.Module:
    return next(module for name, module in model.named_modules()
                if name.endswith("classifier.modules_to_save.default"))


def gradient_norms(hospital: Hospital, records: int = 40) -> dict[str, list[float]]:
    """Per-record gradient norms of the head and of the LoRA matrices, untrained adapter."""
    model = hospital.model
    model.eval()  # dropout off: the norms of the function DP-SGD clips
    norms: dict[str, list[float]] = {"head": [], "lora": [], "all": []}
    for index, batch in enumerate(make_loader(hospital._train, hospital.tokenizer, 1,
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
    return norms


def pooled_vectors(hospital: Hospital) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(vectors the head reads, labels) for the hospital's train and held-out notes."""
    captured: list[torch.Tensor] = []
    hook = _head(hospital.model).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach()))
    hospital.model.eval()
    out = {}
    try:
        for split, records in (("train", hospital._train), ("eval", hospital._eval)):
            captured.clear()
            labels = []
            with torch.no_grad():
                for batch in make_loader(records, hospital.tokenizer, 64, shuffle=False):
                    hospital.model(**{k: v for k, v in batch.items() if k != "labels"})
                    labels.append(batch["labels"])
            out[split] = (torch.cat(captured), torch.cat(labels))
    finally:
        hook.remove()
    return out


def federated_probe(data: list[dict], classes: int, epsilon: float, seed: int, rounds: int = 4,
                    epochs: int = 1, batch_size: int = 16, learning_rate: float = 1e-2,
                    clip: float = 1.0, delta: float = 1e-5, lr_decay: bool = False,
                    ema: float = 0.0) -> float:
    """Accuracy of a head trained by FedAvg over ``data`` (one dict per hospital).

    ``lr_decay``: the rate falls linearly to 0 over all planned steps; ``ema``: each hospital
    sends the exponential moving average of its iterates (decay ``ema``) instead of the last
    one. Both are post-processing of the noisy gradients, free in privacy terms, and both
    are standard ways to damp the jitter DP noise leaves in the final parameters."""
    generator = torch.Generator().manual_seed(seed)
    dim = data[0]["train"][0].shape[1]
    weight = torch.randn(classes, dim, generator=generator) * 0.02
    bias = torch.zeros(classes)
    for round_index in range(rounds):
        updates = []
        for hospital in data:
            x, y = hospital["train"]
            records = len(y)
            rate = batch_size / records
            sigma = 0.0 if math.isinf(epsilon) else get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=rate,
                steps=round(rounds * epochs / rate), accountant="rdp")
            w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
            optimizer = torch.optim.Adam([w, b], lr=learning_rate)
            steps = round(epochs / rate)
            average = (w.detach().clone(), b.detach().clone())
            for step in range(steps):
                if lr_decay:
                    done = (round_index * steps + step) / (rounds * steps)
                    optimizer.param_groups[0]["lr"] = learning_rate * (1.0 - done)
                chosen = torch.rand(records, generator=generator) < rate
                xb, yb = x[chosen], y[chosen]
                with torch.no_grad():
                    residual = torch.softmax(xb @ w.T + b, dim=1)
                    residual[torch.arange(len(yb)), yb] -= 1.0
                    grad_w = residual[:, :, None] * xb[:, None, :]
                    norm = (grad_w.flatten(1).pow(2).sum(1) + residual.pow(2).sum(1)).sqrt()
                    scale = ((clip / (norm + 1e-6)).clamp(max=1.0) if sigma > 0
                             else torch.ones_like(norm))
                    noisy_w = ((grad_w * scale[:, None, None]).sum(0)
                               + sigma * clip * torch.randn(w.shape, generator=generator))
                    noisy_b = ((residual * scale[:, None]).sum(0)
                               + sigma * clip * torch.randn(b.shape, generator=generator))
                w.grad, b.grad = noisy_w / batch_size, noisy_b / batch_size
                optimizer.step()
                for mean, current in zip(average, (w, b), strict=True):
                    mean.mul_(ema).add_(current.detach(), alpha=1.0 - ema)
            updates.append((*average, records))
        total = sum(n for _, _, n in updates)
        weight = sum(w * n for w, _, n in updates) / total
        bias = sum(b * n for _, b, n in updates) / total
    correct = sum(int(((h["eval"][0] @ weight.T + bias).argmax(1) == h["eval"][1]).sum())
                  for h in data)
    return correct / sum(len(h["eval"][1]) for h in data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notes-per-hospital", type=int, nargs="+", default=[300])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 8],
                        help="local epochs per round (4 rounds)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-2, 3e-2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-decay", action="store_true",
                        help="the rate falls linearly to 0 over the planned steps")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="send the moving average of the iterates (e.g. 0.9); 0: the last")
    args = parser.parse_args()
    torch.set_num_threads(1)

    for notes in args.notes_per_hospital:
        settings = _settings(notes)
        labels = source_labels(settings.data)
        members = [Hospital(settings, labels, k, HOSPITALS) for k in range(HOSPITALS)]
        if notes == args.notes_per_hospital[0]:
            norms = gradient_norms(members[0])
            print("per-record gradient norm at the start (40 records of hospital 0, clipping 1.0):")
            for part, values in norms.items():
                print(f"  {part:<5} median {statistics.median(values):.3f}  "
                      f"min {min(values):.3f}  max {max(values):.3f}")
        data = [pooled_vectors(h) for h in members]
        train = len(data[0]["train"][1])
        print(f"\nlinear probe, {train} training notes per hospital, {HOSPITALS} hospitals, "
              f"4 rounds, batch {args.batch_size}, clipping 1.0, delta 1e-5, Adam"
              + (", rate decayed to 0" if args.lr_decay else "")
              + (f", EMA {args.ema:g} of the iterates" if args.ema else ""))
        print("| local epochs | learning rate | non-private | epsilon 8 | epsilon 3 |")
        print("|---|---|---|---|---|")
        for epochs in args.epochs:
            for lr in args.learning_rates:
                row = [statistics.mean(federated_probe(data, len(labels), eps, seed,
                                                       epochs=epochs, learning_rate=lr,
                                                       batch_size=args.batch_size,
                                                       lr_decay=args.lr_decay, ema=args.ema)
                                       for seed in range(args.seeds))
                       for eps in (math.inf, 8.0, 3.0)]
                print(f"| {epochs} | {lr:g} | " + " | ".join(f"{a:.3f}" for a in row) + " |",
                      flush=True)


if __name__ == "__main__":
    main()
