"""What a hospital sends back. These functions are the only way a reply is built, so
what leaves a hospital is visible in one place: trainable-parameter arrays (float32)
and metrics. Never text, never token ids, never labels of single records.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from tasks.evaluation import EvalOutcome
from tasks.training import TrainOutcome


def train_reply(msg: Message, state: dict[str, torch.Tensor], outcome: TrainOutcome,
                hospital: int) -> Message:
    arrays = ArrayRecord({k: v.to(torch.float32) for k, v in state.items()})
    metrics = MetricRecord({
        "num-examples": outcome.num_examples,
        "train-loss": outcome.loss,
        "train-seconds": outcome.seconds,
        "hospital": hospital,
    })
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate_reply(msg: Message, outcome: EvalOutcome, hospital: int) -> Message:
    metrics = MetricRecord({
        "num-examples": outcome.num_examples,
        "eval-loss": outcome.loss,
        "accuracy": outcome.accuracy,
        "macro-f1": outcome.macro_f1,
        # Per-class counts let the server compute the federation's exact macro-F1.
        "true-positives": outcome.true_positives,
        "false-positives": outcome.false_positives,
        "false-negatives": outcome.false_negatives,
        "hospital": hospital,
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def preflight_reply(msg: Message, hospital: int, label_counts: list[int] | None,
                    train_records: int, eval_records: int, problem: str = "") -> Message:
    """Whether this hospital can take part, and how many records of each label it holds."""
    status = ConfigRecord({"ok": not problem, "problem": problem, "hospital": hospital})
    counts = MetricRecord({"train-records": train_records, "eval-records": eval_records,
                           "label-counts": label_counts or [0]})
    return Message(RecordDict({"status": status, "counts": counts}), reply_to=msg)
