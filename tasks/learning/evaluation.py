"""Evaluation of a model on labelled records: loss, accuracy, macro-F1 and per-class counts.

The per-class counts (true positives, false positives, false negatives) are
what lets the server compute the exact macro-F1 of the whole federation; an
average of per-hospital macro-F1 scores is not a macro-F1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader

from tasks.learning.passes import split_passes
from tasks.model.compute import CPU_FP32, Compute


@dataclass
class EvalOutcome:
    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int
    true_positives: list[int]
    false_positives: list[int]
    false_negatives: list[int]


@torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad)
def predict_labels(model: torch.nn.Module, loader: DataLoader, compute: Compute = CPU_FP32
                   ) -> tuple[list[int], list[int], float]:
    """(true labels, predicted labels, summed loss) over the loader."""
    model.eval()
    truths, preds, losses = [], [], []
    # A batch of long notes holds many windows: read at most as many per pass as the batch
    # has notes (tasks/learning/passes.py), the pass size evaluation was tuned at.
    for batch in compute.batches(loader):
        for part, _ in split_passes(batch, loader.batch_size):
            with compute.autocast():
                logits = model(**{k: v for k, v in part.items() if k != "labels"}).logits
            labels = part["labels"]
            losses.append(torch.nn.functional.cross_entropy(logits.float(), labels,
                                                            reduction="sum"))
            preds.append(logits.argmax(dim=-1))
            truths.append(labels)
    if not truths:
        return [], [], 0.0
    return (torch.cat(truths).tolist(), torch.cat(preds).tolist(),
            float(torch.stack(losses).sum()))


def evaluate(model: torch.nn.Module, loader: DataLoader, num_labels: int,
             compute: Compute = CPU_FP32) -> EvalOutcome:
    truths, preds, loss_sum = predict_labels(model, loader, compute)
    n = len(truths)
    tp, fp, fn = [0] * num_labels, [0] * num_labels, [0] * num_labels
    for t, p in zip(truths, preds, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    macro = float(f1_score(truths, preds, labels=list(range(num_labels)), average="macro",
                           zero_division=0)) if n else 0.0
    return EvalOutcome(loss=loss_sum / max(n, 1), accuracy=sum(tp) / max(n, 1), macro_f1=macro,
                       num_examples=n, true_positives=tp, false_positives=fp,
                       false_negatives=fn)
