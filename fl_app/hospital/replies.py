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
Every key is defined, with its rule and what may be sent under DP-SGD, in
``clinical_fl/protocol/messages.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from clinical_fl.protocol import messages as m
from tasks.learning.evaluation import EvalOutcome
from tasks.learning.training import TrainOutcome
from tasks.privacy.lattice import Lattice
from tasks.privacy.policy import EvalRelease


def train_reply(msg: Message, state: dict[str, torch.Tensor], outcome: TrainOutcome,
                hospital: int, equal_weight: bool = False) -> Message:
    """``equal_weight``: client-level DP on the server averages hospitals with equal weights."""
    arrays = ArrayRecord({k: v.to(torch.float32) for k, v in state.items()})
    return Message(RecordDict({m.ARRAYS_RECORD: arrays, m.METRICS_RECORD: MetricRecord(
        _train_metrics(outcome, hospital, equal_weight))}), reply_to=msg)


def distributed_share_reply(msg: Message, share: dict[str, np.ndarray], outcome: TrainOutcome,
                            hospital: int, lattice: Lattice | None, threshold: int) -> Message:
    """Distributed DP's share of a round (already noisy): uint32 lattice levels for SecAgg+ or
    float64 values for CKKS, and how it is encoded. The secure-aggregation mod masks or
    encrypts it as it is; it never leaves the hospital otherwise (the handler refuses to
    compute it without secure aggregation)."""
    encoding = {m.SHARE_ENCODING: m.SHARE_VALUES} if lattice is None else {
        m.SHARE_ENCODING: m.SHARE_LATTICE, m.SHARE_CLIPPING_RANGE: lattice.clipping_range,
        m.SHARE_LEVELS: lattice.levels}
    encoding[m.SHARE_THRESHOLD] = threshold
    return Message(RecordDict({
        m.ARRAYS_RECORD: ArrayRecord({k: Array(np.ascontiguousarray(v))
                                     for k, v in share.items()}),
        m.METRICS_RECORD: MetricRecord(_train_metrics(outcome, hospital, equal_weight=True)),
        m.DISTRIBUTED_SHARE_RECORD: ConfigRecord(encoding)}), reply_to=msg)


def _train_metrics(outcome: TrainOutcome, hospital: int, equal_weight: bool
                   ) -> dict[str, int | float]:
    values: dict[str, int | float] = {
        m.NUM_EXAMPLES: outcome.num_examples,
        m.WEIGHT_KEY: 1 if equal_weight else outcome.num_examples,
        m.HOSPITAL: hospital,
    }
    if outcome.privacy is None:
        values[m.TRAIN_LOSS] = outcome.loss
        values[m.TRAIN_SECONDS] = outcome.seconds
    else:
        # What the protocol's table allows under DP-SGD: no training loss (computed on the
        # training records without noise), no timing. The privacy state is cumulative.
        report = outcome.privacy
        values.update({
            m.EPSILON: report.epsilon,
            m.DELTA: report.delta,
            m.NOISE_MULTIPLIER: report.noise_multiplier,
            m.CLIPPING_NORM: report.max_grad_norm,
            m.SAMPLE_RATE: report.sample_rate,
            m.DP_STEPS: report.steps,
            m.LIFETIME_EPSILON: report.lifetime_epsilon,
            m.LIFETIME_DELTA: report.hospital_delta,
            m.CAN_TRAIN_NEXT: int(report.can_train_next_round),
        })
        if report.epsilon_if_alone is not None:
            values[m.EPSILON_IF_ALONE] = report.epsilon_if_alone
    return values


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
        m.NUM_EXAMPLES: outcome.num_examples,
        m.WEIGHT_KEY: outcome.num_examples,
        m.EVAL_LOSS: outcome.loss if scores else m.WITHHELD,
        m.ACCURACY: outcome.accuracy if scores else m.WITHHELD,
        m.MACRO_F1: outcome.macro_f1 if scores else m.WITHHELD,
        m.TRUE_POSITIVES: outcome.true_positives if counts else [],
        m.FALSE_POSITIVES: outcome.false_positives if counts else [],
        m.FALSE_NEGATIVES: outcome.false_negatives if counts else [],
        m.HOSPITAL: hospital,
    })
    return Message(RecordDict({m.METRICS_RECORD: metrics}), reply_to=msg)


def preflight_reply(msg: Message, hospital: int, label_counts: list[int] | None,
                    train_records: int, eval_records: int,
                    empty_texts_dropped: int = 0, declined: str = "",
                    ckks_public: ConfigRecord | None = None) -> Message:
    """Whether this hospital can take part, and how many records of each label it holds
    (``label_counts`` None: not shared, as under DP-SGD). A problem that stops the run leaves
    as an error reply through the hospital's edge; ``declined`` (its privacy policy refuses the
    run) only keeps this hospital out, and is a refusal line
    (``clinical_fl/protocol/refusals.py``), never
    free text (the edge checks; it sets ``problem`` itself if a reply holds anything else).
    ``ckks_public``: the public half of its CKKS key material (secure_aggregation=ckks)."""
    status = ConfigRecord({m.PREFLIGHT_OK: True, m.PREFLIGHT_PROBLEM: "",
                           m.PREFLIGHT_HOSPITAL: hospital, m.PREFLIGHT_DECLINED: declined})
    counts = MetricRecord({m.TRAIN_RECORDS: train_records, m.EVAL_RECORDS: eval_records,
                           m.EMPTY_TEXTS_DROPPED: empty_texts_dropped})
    if label_counts:
        counts[m.LABEL_COUNTS] = label_counts
    content = RecordDict({m.PREFLIGHT_STATUS_RECORD: status, m.PREFLIGHT_COUNTS_RECORD: counts})
    if ckks_public is not None:
        content[m.PREFLIGHT_CKKS_RECORD] = ckks_public
    return Message(content, reply_to=msg)
