"""Helpers shared by the tests: settings through the product's own compose function, the
MLflow lookups, and an accountant independent of ours. Test modules import from here (and
from the process helpers), never from each other."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from clinical_fl.settings.compose import compose_config, task_settings
from clinical_fl.settings.privacy import Accountant
from clinical_fl.settings.task import TaskSettings
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.privacy.accounting import PLD_RDP_CEILING, RDP_ORDERS

# Settings every test federation shares: the tiny model at short sequences, no LoRA dropout.
FAST = ("model.max_length=64", "model.lora.dropout=0.0")
# De-identification is off unless a test is about it (Presidio is slow; tests/test_deid.py
# and the main end-to-end run cover it).
NO_DEID = "data.deid.enabled=false"


def task(model: Path, *overrides: str, labels: list[str] | None = None,
         planned_rounds: int = 1, deid: bool = False) -> TaskSettings:
    """What a hospital receives, composed exactly as the ServerApp composes it."""
    cfg = compose_config([f"model.name_or_path={model}", *FAST, *overrides,
                          *([] if deid else [NO_DEID])])
    return replace(task_settings(cfg, list(labels or SPECIALTIES)), planned_rounds=planned_rounds)


def run_overrides(model: Path, store: Path, *extra: str, deid: bool = False) -> str:
    """``flwr run`` overrides for a short run of the tiny model into a per-test MLflow store."""
    return " ".join([f"model.name_or_path={model}", f"tracking.uri=sqlite:///{store}/mlflow.db",
                     *FAST, *extra, *([] if deid else [NO_DEID])])


def mlflow_client(store: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")


def only_run(store: Path) -> tuple[MlflowClient, Run]:
    """The one MLflow run in a test's store (a test that made more is wrong)."""
    client = mlflow_client(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """A metric's values by round (MLflow step)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def independent_epsilon(steps: list[tuple[float, float, int]], delta: float,
                        accountant: Accountant = Accountant.pld) -> float:
    """Epsilon of (noise, sample rate, steps) segments through Google's dp-accounting alone,
    under the relation the product claims (zero-out, dp-accounting's REPLACE_SPECIAL), for the
    accountant the product reports with (PLD by default):

    - ``rdp``: dp-accounting's RDP accountant on the product's orders, an implementation
      independent of ours and of Opacus;
    - ``pld``: dp-accounting's ``PLDAccountant`` (pessimistic, its own discretisation), event by
      event as the library composes them, where the product builds the distributions itself;
      as the product reports it, never above the RDP figure, and RDP's where that is above
      ``PLD_RDP_CEILING`` (tasks/privacy/accounting.py)."""
    return _independent_epsilon(tuple((float(z), float(q), int(n)) for z, q, n in steps),
                                float(delta), accountant)


@lru_cache(maxsize=256)  # a PLD takes about half a second; tests ask again for the same steps
def _independent_epsilon(steps: tuple[tuple[float, float, int], ...], delta: float,
                         accountant: Accountant) -> float:
    zero_out = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    events = [(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)),
               count) for noise, rate, count in steps]
    rdp = RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=zero_out)
    for event, count in events:
        rdp.compose(event, count)
    rdp_epsilon = rdp.get_epsilon(delta)
    if accountant == Accountant.rdp or rdp_epsilon > PLD_RDP_CEILING:
        return rdp_epsilon
    assert accountant == Accountant.pld, accountant
    pld = PLDAccountant(neighboring_relation=zero_out)
    for event, count in events:
        pld.compose(event, count)
    return min(rdp_epsilon, pld.get_epsilon(delta))


def checkpointed_round(store: Path) -> int:
    """The last round a run in ``store`` checkpointed (its state directory beside the MLflow
    database); -1 before the first. Never torn: a read that fails is a file being replaced."""
    from strategies.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint

    files = list((store / "server-state").glob(f"*/{CHECKPOINT_FILE}"))
    try:
        return load_checkpoint(files[0]).round if files else -1
    except CheckpointError:
        return -1


def wait_until(condition: Callable[[], bool], timeout: float, what: str,
               every: float = 0.5) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


class TwoNodeGrid:
    """What a Flower strategy's ``configure_train`` asks of a Grid, for in-process rounds:
    nodes 1 and 2 connected."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def create_message(self, content, message_type, dst_node_id, group_id):
        from flwr.app import Message

        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)
