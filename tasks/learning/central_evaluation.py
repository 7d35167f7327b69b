"""Centralized evaluation: the server scores the global adapter on a test set it holds.

Only for data the coordinator may hold (the synthetic default, or a public
benchmark test split); in a real federation of private records it is off.
"""

from __future__ import annotations

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from tasks.learning.batches import Chunking, make_loader, tokenize
from tasks.learning.evaluation import evaluate
from tasks.model.build import load_trainable_state
from tasks.model.compute import CPU_FP32, Compute


class CentralEvaluator:
    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 records: datasets.Dataset, num_labels: int, max_length: int,
                 batch_size: int, compute: Compute = CPU_FP32,
                 group_by_length: bool = True, chunking: Chunking | None = None) -> None:
        self.model = model.to(compute.device)
        self.num_labels = num_labels
        self.compute = compute
        self.loader = make_loader(tokenize(records, tokenizer, max_length, chunking), tokenizer,
                                  batch_size, shuffle=False, group_by_length=group_by_length)

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float | list[int]]:
        load_trainable_state(self.model, state)
        outcome = evaluate(self.model, self.loader, self.num_labels, self.compute)
        return {"accuracy": outcome.accuracy, "macro_f1": outcome.macro_f1,
                "loss": outcome.loss, "records": outcome.num_examples,
                # per class, for recall and F1 per label (clinical_fl/tracking/per_class.py)
                "true_positives": outcome.true_positives,
                "false_positives": outcome.false_positives,
                "false_negatives": outcome.false_negatives}
