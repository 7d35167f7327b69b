"""Typed settings of aggregation: which Flower strategy, and client-level DP on the server."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class StrategyName(Enum):
    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedyogi = "fedyogi"
    fedavgm = "fedavgm"
    fedmedian = "fedmedian"
    fedtrimmedavg = "fedtrimmedavg"
    krum = "krum"


@dataclass
class StrategySettings:
    name: StrategyName = StrategyName.fedavg
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # Hospitals that must be connected (and sampled) before a round starts.
    min_hospitals: int = 2
    # Seconds to wait for replies in a round; a hospital slower than this is dropped.
    round_timeout_s: float = 3600.0
    # Strategy parameters; each strategy reads only its own (see conf/strategy/*.yaml).
    proximal_mu: float = 0.0
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    eta: float = 1e-2
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0


@dataclass
class CentralDpSettings:
    """Client-level DP on the server: Flower's fixed-clipping wrapper adds Gaussian noise to
    the aggregate of hospital updates, each clipped inside the hospital to ``clipping_norm``."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    # None: 1e-5 (strategies/central_dp.py)
    target_delta: float | None = None
    # The server stops before a release that would exceed it.
    max_epsilon: float | None = None
