"""The state a strategy carries from round to round, out of Flower's strategies and back.

Flower's strategies keep their state in attributes and offer no state_dict: FedAdam and
FedYogi their moments ``m_t``/``v_t``, FedAvgM its ``momentum_vector``; client-level DP its
RDP accountant (which does have ``state_dict``). Everything else (FedAvg, FedProx,
FedMedian, FedTrimmedAvg, Krum) is stateless between rounds, and the arrays a strategy
remembers of the current round (``current_arrays``) are the global adapter, which the
checkpoint holds anyway. This module is the one place that knows where each keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.serverapp.strategy.fedopt import FedOpt


def chain(strategy: Strategy) -> Iterator[Strategy]:
    """The strategy and every strategy it wraps, outermost first."""
    while strategy is not None:
        yield strategy
        strategy = getattr(strategy, "strategy", None)


def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, JSON-able state) of the wrapped chain."""
    arrays: dict[str, np.ndarray] = {}
    state: dict = {}
    for part in chain(strategy):
        if isinstance(part, FedOpt):
            for name in ("m_t", "v_t"):
                for key, value in (getattr(part, name) or {}).items():
                    arrays[f"{name}/{key}"] = np.asarray(value)
        if isinstance(part, FedAvgM) and part.momentum_vector is not None:
            for i, value in enumerate(part.momentum_vector):
                arrays[f"momentum_vector/{i:05d}"] = np.asarray(value)
        if isinstance(part, DifferentialPrivacyFixedClippingBase) and part.accountant:
            state["client_level_accountant"] = part.accountant.state_dict()
    return arrays, state


def restore_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray],
                           state: dict) -> None:
    """Put back what ``strategy_state`` took out, into a freshly built chain."""
    for part in chain(strategy):
        if isinstance(part, FedOpt):
            for name in ("m_t", "v_t"):
                prefix = f"{name}/"
                moments = {k.removeprefix(prefix): v for k, v in arrays.items()
                           if k.startswith(prefix)}
                setattr(part, name, moments or None)
        if isinstance(part, FedAvgM):
            momentum = sorted(k for k in arrays if k.startswith("momentum_vector/"))
            part.momentum_vector = [arrays[k] for k in momentum] or None
        if isinstance(part, DifferentialPrivacyFixedClippingBase) and part.accountant:
            saved = state.get("client_level_accountant")
            if saved is not None:
                part.accountant.load_state_dict(saved)
