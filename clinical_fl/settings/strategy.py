"""Typed settings of aggregation: which Flower strategy, and client-level DP on the server.

Like every settings dataclass (see ``clinical_fl/settings/task.py``) these hold the one set of
defaults and check themselves when built; ``conf/strategy/*.yaml`` only picks the name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from clinical_fl.settings.bounds import (
    require_defaults_while_off,
    require_open_unit,
    require_positive,
)
from clinical_fl.settings.checks import as_enum, require


class HeadAggregation(Enum):
    """How the classification head's rows are averaged (strategies/class_wise_head.py)."""

    examples = "examples"  # like every other parameter: weighted by training records
    class_counts = "class_counts"  # row c over the hospitals holding class c, by their count
    # class_counts where it can hold and some hospital lacks a class the others hold (from
    # preflight's label counts), else examples (fl_app/server/head_aggregation.py)
    auto = "auto"


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
    # Strategy parameters; each strategy reads only its own (strategies/registry.py).
    proximal_mu: float = 0.1  # fedprox
    server_learning_rate: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    # fedadam, fedyogi
    eta: float = 1e-2
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2  # fedtrimmedavg
    num_malicious_nodes: int = 0  # krum
    # class_counts: each class's head row is the average over the hospitals that hold the
    # class, weighted by their records of it (from preflight's label counts), so a class held
    # by one small hospital is not diluted by the hospitals that never see it. fedavg and
    # fedprox, non-private runs without secure aggregation only (it reads each update).
    head_aggregation: HeadAggregation = HeadAggregation.auto

    def __post_init__(self) -> None:
        self.name = as_enum(StrategyName, self.name, "strategy.name")
        self.head_aggregation = as_enum(HeadAggregation, self.head_aggregation,
                                        "strategy.head_aggregation")
        require(self.min_hospitals >= 1, "strategy.min_hospitals", self.min_hospitals,
                "at least 1")
        require(0 < self.fraction_train <= 1, "strategy.fraction_train", self.fraction_train,
                "in (0, 1]")
        require(0 < self.fraction_evaluate <= 1, "strategy.fraction_evaluate",
                self.fraction_evaluate, "in (0, 1]")
        require(self.round_timeout_s > 0, "strategy.round_timeout_s", self.round_timeout_s,
                "greater than 0")
        require(self.proximal_mu >= 0, "strategy.proximal_mu", self.proximal_mu, "at least 0")
        require(0 <= self.trim_beta < 0.5, "strategy.trim_beta", self.trim_beta, "in [0, 0.5)")
        require(self.num_malicious_nodes >= 0, "strategy.num_malicious_nodes",
                self.num_malicious_nodes, "at least 0")


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

    SECTION: ClassVar[str] = "privacy.central_dp"
    # The options of conf/privacy/ that switch it on, as the user types them.
    TURN_ON: ClassVar[str] = "privacy=central_dp or privacy=dp_sgd_central_dp"

    def __post_init__(self) -> None:
        key = self.SECTION
        # Switched off, every value must be the default (a noise or a clipping norm given for
        # a mechanism that is off would be silently ignored); on or off, none is NaN or inf.
        if not self.enabled:
            require_defaults_while_off(self, key, "enabled", self.TURN_ON)
        require_positive(self.noise_multiplier, f"{key}.noise_multiplier")
        require_positive(self.clipping_norm, f"{key}.clipping_norm")
        if self.target_delta is not None:
            require_open_unit(self.target_delta, f"{key}.target_delta")
        if self.max_epsilon is not None:
            require_positive(self.max_epsilon, f"{key}.max_epsilon")
