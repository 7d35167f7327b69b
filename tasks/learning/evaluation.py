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


@dataclass
class EvalOutcome:
    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int
    true_positives: list[int]
    false_positives: list[int]
    false_negatives: list[int]


@torch.no_grad()
def predict_labels(model: torch.nn.Module, loader: DataLoader
                   ) -> tuple[list[int], list[int], float]:
    """(true labels, predicted labels, summed loss) over the loader."""
    model.eval()
    truths, preds, loss_sum = [], [], 0.0
    for batch in loader:
        out = model(**batch)
        loss_sum += out.loss.item() * batch["labels"].shape[0]
        preds += out.logits.argmax(dim=-1).tolist()
        truths += batch["labels"].tolist()
    return truths, preds, loss_sum


def evaluate(model: torch.nn.Module, loader: DataLoader, num_labels: int) -> EvalOutcome:
    truths, preds, loss_sum = predict_labels(model, loader)
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
