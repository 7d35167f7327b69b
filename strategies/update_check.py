"""Check every train reply before it is aggregated; leave out the ones that would poison the
global adapter, name the hospital and why, and drop a hospital that keeps failing.

A reply with one NaN averaged in makes every value of the global adapter NaN, and every
hospital's next round with it; a reply of the wrong keys or shapes (a version mismatch)
makes Flower's aggregation fail the whole run. Checked against the global adapter the round
was sent: the same keys, the same shapes, float32, every value finite, and the update
(reply - global) of L2 norm at most the configured bound. A reply that fails is left out,
as Flower leaves out error replies, and the round goes on with the others.

Under secure aggregation the server never sees one hospital's update: every contributing
hospital's reply carries the same aggregate, so a failure is the sum's, no hospital can be
named or dropped for it, and the round aggregates nothing; the norm bound, a bound on one
hospital's update, is not applied to the sum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clinical_fl.settings.recovery import UpdateCheckSettings
from strategies.wrapper import StrategyWrapper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    hospital: int
    reason: str


def structural_problem(reply: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> str | None:
    """Why ``reply`` cannot be an update of ``global_arrays`` (keys, shapes, dtype, finite)."""
    missing, extra = global_arrays.keys() - reply.keys(), reply.keys() - global_arrays.keys()
    if missing or extra:
        parts = [f"missing {sorted(missing)[:3]}" if missing else "",
                 f"unexpected {sorted(extra)[:3]}" if extra else ""]
        return "keys differ from the global adapter: " + ", ".join(p for p in parts if p)
    for key, expected in global_arrays.items():
        array = reply[key]
        if tuple(array.shape) != expected.shape:
            return f"{key}: shape {tuple(array.shape)}, expected {expected.shape}"
        if array.dtype != "float32":
            return f"{key}: dtype {array.dtype}, expected float32"
        values = array.numpy()
        if not np.isfinite(values).all():
            kinds = [name for name, bad in (("NaN", np.isnan(values).any()),
                                            ("Inf", np.isinf(values).any())) if bad]
            return f"{key}: {' and '.join(kinds)} values"
    return None


def update_norm(reply: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of reply - global over every array (float64: no overflow)."""
    return float(sum(np.sum((reply[k].numpy().astype(np.float64) - v) ** 2)
                     for k, v in global_arrays.items())) ** 0.5


def update_problem(reply: ArrayRecord, global_arrays: dict[str, np.ndarray],
                   max_update_norm: float | None) -> str | None:
    """Why ``reply`` may not be aggregated into ``global_arrays``; None if it may."""
    problem = structural_problem(reply, global_arrays)
    if problem is None and max_update_norm is not None:
        norm = update_norm(reply, global_arrays)
        if norm > max_update_norm:
            problem = (f"update L2 norm {norm:.4g} above update_checks.max_update_norm "
                       f"{max_update_norm:g}")
    return problem


class UpdateCheck(StrategyWrapper):
    """Wraps a strategy; only train replies that pass ``update_problem`` reach it.

    ``hospital_of``: node id -> hospital number, for messages; ``drop``: (node id, reason),
    called once a hospital reaches ``settings.drop_after`` rejected replies (the budget
    gate's ``exclude``: it is sent no more work); ``summed``: secure aggregation, the
    replies carry the sum (see the module's docstring).
    """

    def __init__(self, strategy: Strategy, settings: UpdateCheckSettings,
                 hospital_of: Callable[[int], int], drop: Callable[[int, str], None],
                 summed: bool = False) -> None:
        super().__init__(strategy)
        self.settings = settings
        self.hospital_of = hospital_of
        self.drop = drop
        self.summed = summed
        self.rejected_total: dict[int, int] = {}  # hospital -> rejected replies so far
        self.round_rejections: list[Rejection] = []  # this round's, until taken
        self.round_largest_update: float | None = None  # L2 norm, of the replies that passed
        self._global: dict[str, np.ndarray] = {}

    def take_round(self) -> tuple[list[Rejection], float | None]:
        """This round's rejections and largest accepted update norm, then reset."""
        taken = self.round_rejections, self.round_largest_update
        self.round_rejections, self.round_largest_update = [], None
        return taken

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept, failed = [], []
        for reply in replies:
            problem = None if reply.has_error() else self._problem(reply)
            (failed if problem else kept).append((reply, problem))
        if failed and self.summed:
            hospitals = sorted(self.hospital_of(r.metadata.src_node_id) for r in replies
                               if not r.has_error())
            reason = f"secure aggregate of hospitals {hospitals}: {failed[0][1]}"
            log.warning("round %d: %s; nothing aggregated (no single hospital can be named: "
                        "the server sees only the sum)", server_round, reason)
            self.round_rejections.append(Rejection(-1, reason))
            return self.strategy.aggregate_train(server_round, [
                r for r in replies if r.has_error()])
        for reply, problem in failed:
            self._reject(server_round, reply.metadata.src_node_id, problem)
        return self.strategy.aggregate_train(server_round, [r for r, _ in kept])

    def _problem(self, reply: Message) -> str | None:
        records = list(reply.content.array_records.values())
        if len(records) != 1:
            return f"{len(records)} array records, expected 1"
        problem = structural_problem(records[0], self._global)
        if problem is not None:
            return problem
        norm = update_norm(records[0], self._global)
        bound = self.settings.max_update_norm
        # A secure aggregate's norm is the sum's (with distributed DP, of the shared noise
        # too): the per-hospital bound does not apply to it.
        if bound is not None and norm > bound and not self.summed:
            return f"update L2 norm {norm:.4g} above update_checks.max_update_norm {bound:g}"
        self.round_largest_update = max(norm, self.round_largest_update or 0.0)
        return None

    def _reject(self, server_round: int, node: int, problem: str) -> None:
        hospital = self.hospital_of(node)
        count = self.rejected_total.get(hospital, 0) + 1
        self.rejected_total[hospital] = count
        self.round_rejections.append(Rejection(hospital, problem))
        log.warning("round %d: update of hospital %s rejected (%d so far): %s", server_round,
                    hospital, count, problem)
        if count >= self.settings.drop_after:
            self.drop(node, f"hospital {hospital} dropped after {count} rejected updates "
                            f"(update_checks.drop_after={self.settings.drop_after}); last: "
                            f"{problem}")
