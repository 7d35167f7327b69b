"""What a hospital sends back. These functions are the only way a reply is built, so
what leaves a hospital is visible in one place: trainable-parameter arrays (float32)
and metrics. Never text, never token ids, never labels of single records.

Under DP-SGD exactly this leaves a hospital: the adapter arrays (covered by
epsilon), record counts (treated as public), its privacy state (epsilon, delta,
noise, clipping norm, sampling rate, steps, whether it can train on), and the
evaluation metrics its policy releases (``aggregate`` by default: accuracy,
loss and macro-F1 of its held-out notes; per-class counts withheld). No training
loss, no per-label training counts, no timing: each is an exact function of
the private records (a round's duration follows the Poisson batch sizes).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from strategies.metric_rules import WITHHELD
from strategies.privacy_budget import CAN_TRAIN_NEXT_KEY, PRIVACY_BUDGET_REFUSED
from strategies.registry import WEIGHT_KEY
from tasks.evaluation import EvalOutcome
from tasks.privacy.policy import EvalRelease
from tasks.training import TrainOutcome


def train_reply(msg: Message, state: dict[str, torch.Tensor], outcome: TrainOutcome,
                hospital: int, equal_weight: bool = False) -> Message:
    """``equal_weight``: client-level DP on the server averages hospitals with equal weights."""
    arrays = ArrayRecord({k: v.to(torch.float32) for k, v in state.items()})
    values: dict[str, int | float] = {
        "num-examples": outcome.num_examples,
        WEIGHT_KEY: 1 if equal_weight else outcome.num_examples,
        "hospital": hospital,
    }
    if outcome.privacy is None:
        values["train-loss"] = outcome.loss
        values["train-seconds"] = outcome.seconds
    else:
        # No training loss under DP-SGD: it is computed on the training records without
        # noise, outside what epsilon covers. The privacy state is cumulative over the run.
        report = outcome.privacy
        values.update({
            "epsilon": report.epsilon,
            "delta": report.delta,
            "noise-multiplier": report.noise_multiplier,
            "clipping-norm": report.max_grad_norm,
            "sample-rate": report.sample_rate,
            "dp-steps": report.steps,
            "lifetime-epsilon": report.lifetime_epsilon,
            "lifetime-delta": report.hospital_delta,
            CAN_TRAIN_NEXT_KEY: int(report.can_train_next_round),
        })
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(values)}),
                   reply_to=msg)


def refusal_reply(msg: Message, reason: str) -> Message:
    """A hospital declines a round over its privacy budget: no update, only the reason."""
    return Message(Error(code=PRIVACY_BUDGET_REFUSED, reason=reason), reply_to=msg)


def evaluate_reply(msg: Message, outcome: EvalOutcome, hospital: int,
                   release: EvalRelease = EvalRelease.full) -> Message:
    """``release``: what the hospital's policy lets out of its held-out notes.

    The keys are always the same (Flower aggregates only replies with identical keys,
    and hospitals may have different policies): a withheld score is NaN, withheld
    per-class counts are empty lists.
    """
    scores = release in (EvalRelease.aggregate, EvalRelease.full)
    # Per-class counts let the server compute the federation's exact macro-F1; they also
    # add up to the held-out label histogram, so only the full release has them.
    counts = release == EvalRelease.full
    metrics = MetricRecord({
        "num-examples": outcome.num_examples,
        WEIGHT_KEY: outcome.num_examples,
        "eval-loss": outcome.loss if scores else WITHHELD,
        "accuracy": outcome.accuracy if scores else WITHHELD,
        "macro-f1": outcome.macro_f1 if scores else WITHHELD,
        "true-positives": outcome.true_positives if counts else [],
        "false-positives": outcome.false_positives if counts else [],
        "false-negatives": outcome.false_negatives if counts else [],
        "hospital": hospital,
    })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def preflight_reply(msg: Message, hospital: int, label_counts: list[int] | None,
                    train_records: int, eval_records: int, problem: str = "",
                    empty_texts_dropped: int = 0, declined: str = "") -> Message:
    """Whether this hospital can take part, and how many records of each label it holds
    (``label_counts`` None: not shared, as under DP-SGD). ``problem`` stops the run;
    ``declined`` (its privacy policy refuses the run) only keeps this hospital out."""
    status = ConfigRecord({"ok": not problem, "problem": problem, "hospital": hospital,
                           "declined": declined})
    counts = MetricRecord({"train-records": train_records, "eval-records": eval_records,
                           "empty-texts-dropped": empty_texts_dropped})
    if label_counts:
        counts["label-counts"] = label_counts
    return Message(RecordDict({"status": status, "counts": counts}), reply_to=msg)
