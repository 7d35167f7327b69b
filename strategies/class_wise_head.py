"""The classification head averaged class by class (``strategy.head_aggregation=class_counts``).

FedAvg weighs every parameter by the hospital's training records. For the head's row of
class c (its weights and bias) that is the wrong weight when hospitals hold different classes:
a class held by one small hospital gets its row averaged with the rows of hospitals that never
see it, so each round keeps a fraction of what its one holder learned (and with the full
softmax the others even push it down). Here row c is the average of the rows of the hospitals
that hold class c, weighted by how many records of it each holds (the label counts of
preflight); a class nobody holds keeps the inner strategy's row. Every other parameter is the
inner strategy's aggregate. Pairs naturally with ``train.absent_class_scale=0`` (a hospital
then leaves the rows of classes it lacks untouched).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from clinical_fl.protocol import messages as m
from strategies.wrapper import StrategyWrapper


def class_wise_rows(rows: Sequence[np.ndarray], counts: Sequence[Sequence[int]],
                    fallback: np.ndarray) -> np.ndarray:
    """Row c (first axis) = sum over hospitals h of counts[h][c] x rows[h][c], divided by the
    sum of counts[h][c]; ``fallback``'s row where no hospital holds class c."""
    weights = np.asarray(counts, dtype=np.float64)  # hospitals x classes
    totals = weights.sum(axis=0)
    stacked = np.stack([np.asarray(r, dtype=np.float64) for r in rows])  # h x classes x ...
    shape = (len(rows), len(totals)) + (1,) * (stacked.ndim - 2)
    summed = (stacked * weights.reshape(shape)).sum(axis=0)
    held = (totals > 0).reshape((-1,) + (1,) * (stacked.ndim - 2))
    averaged = summed / np.where(held, totals.reshape(held.shape), 1.0)
    return np.where(held, averaged, fallback).astype(fallback.dtype)


class ClassWiseHead(StrategyWrapper):
    def __init__(self, strategy: Strategy, head_keys: Sequence[str],
                 label_counts: Mapping[int, Sequence[int]]) -> None:
        """``head_keys``: the head's parameter names in the adapter; ``label_counts``: each
        hospital's (node id's) records per class, from its preflight reply."""
        super().__init__(strategy)
        self.head_keys = list(head_keys)
        self.label_counts = dict(label_counts)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        used = [r for r in replies if not r.has_error() and m.ARRAYS_RECORD in r.content
                and r.metadata.src_node_id in self.label_counts]
        if arrays is None or not used:
            return arrays, metrics
        counts = [self.label_counts[r.metadata.src_node_id] for r in used]
        for key in self.head_keys:
            fallback = arrays[key].numpy()
            rows = [r.content[m.ARRAYS_RECORD][key].numpy() for r in used]
            arrays[key] = Array(class_wise_rows(rows, counts, fallback))
        return arrays, metrics
