"""What a run prints: one line per event, through Flower's console handler, nothing twice.

Called by both apps when they are imported, before the libraries whose noise it stops:

- Opacus calls ``logging.basicConfig`` when imported, which gives the root logger a second
  handler: every line of Flower's logger (which propagates) then appeared twice, the second
  time with a date and Flower's DEBUG lines beside it. A root handler installed first (only
  warnings, Flower's format) makes that call a no-op, and Flower's logger stops propagating.
- Third-party warnings that say nothing to a user of this product are filtered by message
  and category, not all warnings: SQLAlchemy's deprecation inside MLflow's store, Ray's
  notice about a future default, MLflow's type-hint suggestion for pyfunc models.
- On the server, the strategy's own narration (its settings, every config record it sends
  (the task settings, a page of YAML), each aggregated metric record, and the final dump of
  every round) is replaced by one line per round from ``RoundConsole``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import FLOWER_LOGGER, update_console_handler

# The server-side packages of this product: their INFO lines go to the run's console.
SERVER_LOGGERS = ("fl_app", "strategies", "clinical_fl")
_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"
_STRATEGY_CODE = f"{os.sep}flwr{os.sep}serverapp{os.sep}strategy{os.sep}"


def quiet_third_party() -> None:
    """Stop duplicated log lines and known-noise warnings in this process (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # Opacus' basicConfig, when it was imported first
        if getattr(handler.formatter, "_fmt", None) == _OPACUS_FORMAT:
            root.removeHandler(handler)
    if not any(getattr(h, "_clinical_fl", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)-8s: %(name)s: %(message)s"))
        handler._clinical_fl = True  # type: ignore[attr-defined]
        root.addHandler(handler)  # before Opacus: its basicConfig is then a no-op
    FLOWER_LOGGER.propagate = False
    if os.environ.get("NO_COLOR") or os.environ.get("CI"):
        update_console_handler(colored=False)  # CI logs and NO_COLOR terminals: plain text
    # MLflow narrates at INFO (creating its tables, validating the input example, starting
    # and stopping the system-metrics monitor); the run's own lines say what matters.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*[Tt]he ``noload`` loader strategy")
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"Tip: In future versions of Ray")
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r".*Add type hints to the `predict` method")
    # pandas' notice about a comparison inside MLflow's input-example check
    warnings.filterwarnings("ignore", message=r"Operation with range is deprecated")


class _NotStrategyNarration(logging.Filter):
    """Drops the INFO lines of Flower's strategy code (its warnings and errors stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _STRATEGY_CODE not in record.pathname


def speak_for_the_server() -> None:
    """In the ServerApp's process: this product's loggers print INFO lines through Flower's
    console handler (so they reach ``flwr run --stream`` in Flower's format), and the
    strategy's narration is left out."""
    quiet_third_party()
    if not any(isinstance(f, _NotStrategyNarration) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_NotStrategyNarration())
    for name in SERVER_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.handlers = list(FLOWER_LOGGER.handlers)


def _score(history: Mapping[str, float], prefix: str) -> str | None:
    accuracy, f1 = history.get(f"{prefix}/accuracy"), history.get(f"{prefix}/macro_f1")
    if accuracy is None or accuracy != accuracy:  # absent, or NaN (withheld)
        return None
    text = f"{prefix} accuracy {accuracy:.3f}"
    return text + (f" macro-F1 {f1:.3f}" if f1 is not None and f1 == f1 else "")


def round_line(server_round: int, num_rounds: int, metrics: Mapping[str, float]) -> str:
    """One line that says how a round went, from what was logged to MLflow for it."""
    parts = [f"round {server_round}/{num_rounds}"]
    if "round/seconds" in metrics:
        parts.append(f"{metrics['round/seconds']:.0f} s")
    if server_round > 0 and "round/train_replies" in metrics:
        trained = int(metrics["round/train_replies"])
        failed = int(metrics.get("round/error_replies", 0))
        rejected = int(metrics.get("round/rejected_replies", 0))
        parts.append(f"{trained} hospital{'s' if trained != 1 else ''} trained"
                     + (f", {failed} error repl{'ies' if failed != 1 else 'y'}" if failed else "")
                     + (f", {rejected} rejected" if rejected else ""))
    if server_round > 0 and "train/loss" in metrics:
        parts.append(f"train loss {metrics['train/loss']:.3f}")
    parts += [s for s in (_score(metrics, "federated"), _score(metrics, "central")) if s]
    if "privacy/epsilon_max" in metrics:
        parts.append(f"epsilon {metrics['privacy/epsilon_max']:.2f}")
    return " | ".join(parts)


class RoundConsole:
    """Flower's evaluate_fn after each round: the round's end (``RoundEnd``: checkpoint and
    MLflow) first, then the round's one line on the console."""

    def __init__(self, round_end: Callable[[int, ArrayRecord], MetricRecord | None],
                 history: Callable[[], Mapping[int, Mapping[str, float]]],
                 num_rounds: int) -> None:
        self.round_end, self.history, self.num_rounds = round_end, history, num_rounds

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        result = self.round_end(server_round, arrays)
        logging.getLogger("fl_app.rounds").info(
            "%s", round_line(server_round, self.num_rounds,
                             self.history().get(server_round, {})))
        return result
