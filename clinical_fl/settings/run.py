"""The settings of a whole run: the sections a hospital receives, plus the server's own
(strategy, client-level DP, tracking, rounds). Registered in Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from clinical_fl.settings.bounds import field_default
from clinical_fl.settings.checks import ConfigError, require
from clinical_fl.settings.early_stopping import EarlyStoppingSettings
from clinical_fl.settings.privacy import (
    MECHANISM_KEY,
    PrivacySettings,
    RecordLevelMechanism,
    check_precision_fits_dp_sgd,
)
from clinical_fl.settings.recovery import CheckpointSettings, UpdateCheckSettings
from clinical_fl.settings.secure_aggregation import SecureAggregationMode
from clinical_fl.settings.strategy import (
    CentralDpSettings,
    HeadAggregation,
    StrategyName,
    StrategySettings,
)
from clinical_fl.settings.task import SharedSettings
from clinical_fl.settings.tracking import TrackingSettings
from clinical_fl.settings.train import LearningRateSchedule

SCHEMA_NAME = "run_settings"

# Strategies that need each hospital's update, not only the sum: refused with secure aggregation.
NEEDS_INDIVIDUAL_UPDATES = (StrategyName.krum, StrategyName.fedmedian, StrategyName.fedtrimmedavg)


@dataclass
class RunPrivacySettings(PrivacySettings):
    """``conf/privacy/``: record-level DP in the hospitals, client-level DP on the server."""

    central_dp: CentralDpSettings = field(default_factory=CentralDpSettings)


@dataclass
class RunSettings(SharedSettings):
    """Everything a run is configured by: the hospitals' sections, and the server's own.
    Checks that span sections live here."""

    privacy: RunPrivacySettings = field(default_factory=RunPrivacySettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    num_rounds: int = 4
    # Federated and central evaluation after every k-th round (and round 0 and the last):
    # runs of hundreds of one-step rounds (distributed DP) would spend most of their time
    # scoring otherwise.
    evaluate_every: int = 1
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    update_checks: UpdateCheckSettings = field(default_factory=UpdateCheckSettings)
    # num_rounds as a ceiling: a non-private run stops when the federated validation score
    # stops improving and keeps its best round's adapter (clinical_fl/settings/early_stopping.py).
    early_stopping: EarlyStoppingSettings = field(default_factory=EarlyStoppingSettings)
    # The MLflow run id of a run to continue from its last checkpoint (its configuration,
    # except the keys in fl_app/server/resume.py::MAY_CHANGE; metrics go on in the same MLflow run).
    resume: str | None = None

    def __post_init__(self) -> None:
        require(self.num_rounds >= 1, "num_rounds", self.num_rounds, "at least 1")
        require(self.evaluate_every >= 1, "evaluate_every", self.evaluate_every, "at least 1")
        strategy = self.strategy
        check_precision_fits_dp_sgd(self.train, self.privacy)
        if self.privacy.mechanism == RecordLevelMechanism.dp_sgd:
            require(strategy.name != StrategyName.fedprox or strategy.proximal_mu == 0,
                    "strategy.proximal_mu", strategy.proximal_mu, "0 with privacy.dp_sgd: "
                    "FedProx's proximal term is not part of the DP-SGD analysis")
        # Given weights need no counts: a release would spend privacy budget for nothing.
        require(self.privacy.dp_sgd.label_count_noise is None or self.train.class_weights is None,
                "privacy.dp_sgd.label_count_noise", self.privacy.dp_sgd.label_count_noise,
                "null with train.class_weights given (the counts would not be used)")
        self._check_head_aggregation()
        self._check_secure_aggregation()
        self._check_distributed_dp()
        self._resolve_early_stopping()
        if self.privacy.central_dp.enabled:
            require(strategy.name == StrategyName.fedavg, "strategy.name", strategy.name.value,
                    "fedavg with privacy.central_dp: Flower's DP accountant requires FedAvg's "
                    "aggregation")
            require(strategy.fraction_train == 1.0, "strategy.fraction_train",
                    strategy.fraction_train, "1.0 with privacy.central_dp: its noise is "
                    "calibrated to every hospital in every round")

    def private_mechanism(self) -> str | None:
        """The setting that makes this run private (None: a non-private run)."""
        if self.privacy.record_level:
            return f"{MECHANISM_KEY}={self.privacy.mechanism.value}"
        if self.privacy.central_dp.enabled:
            return "privacy.central_dp.enabled=true"
        return None

    def _resolve_early_stopping(self) -> None:
        """``early_stopping.enabled``: null becomes on for a non-private run, off for a
        private one and for a privacy sweep's non-private level (it is compared with private
        levels that train every round); true in a private run is refused. Off that way, a
        value given for another early-stopping setting is refused as for any switched-off
        mechanism."""
        section, private = self.early_stopping, self.private_mechanism()
        key = section.SECTION
        if private:
            require(section.enabled is not True, f"{key}.enabled", True,
                    f"false or null with {private}: the noise is calibrated for "
                    f"num_rounds={self.num_rounds}, and a private run trains every round")
        sweep_level = self.privacy.sweep_level_without_dp
        if section.enabled is None:
            section.enabled = not (private or sweep_level)
            if not section.enabled:
                why = (f"{private}: a private run trains every planned round" if private
                       else "a privacy sweep's non-private level (target_epsilon=inf): it "
                            "trains every round, as the private levels it is compared with")
                for name in ("patience", "min_delta", "metric"):
                    value, default = getattr(section, name), field_default(section, name)
                    if value != default:
                        raise ConfigError(
                            f"invalid configuration at '{key}.{name}': got {value!r} while "
                            f"early stopping is off for {why}. Leave '{key}.{name}' at its "
                            f"default ({default!r})", f"{key}.{name}")

    def class_wise_head_possible(self) -> bool:
        """Whether strategy.head_aggregation=class_counts can hold in this run."""
        return (self.strategy.name in (StrategyName.fedavg, StrategyName.fedprox)
                and self.private_mechanism() is None and not self.secure_aggregation.enabled)

    def _check_head_aggregation(self) -> None:
        """Class-wise head rows need each hospital's update and exact label counts."""
        if self.strategy.head_aggregation != HeadAggregation.class_counts:
            return
        key = "strategy.head_aggregation"
        require(self.strategy.name in (StrategyName.fedavg, StrategyName.fedprox), key,
                "class_counts", "examples with strategy.name="
                f"{self.strategy.name.value} (class_counts averages rows as FedAvg does)")
        private = self.private_mechanism()
        require(private is None, key, "class_counts",
                f"examples with {private} (hospitals withhold their exact label counts, "
                "and the rows would bypass the noise)")
        require(not self.secure_aggregation.enabled, key, "class_counts",
                "examples with secure aggregation (the server sees only the sum)")

    def _check_distributed_dp(self) -> None:
        if self.privacy.mechanism != RecordLevelMechanism.distributed_dp:
            return
        key, chosen = MECHANISM_KEY, "distributed_dp"
        require(self.secure_aggregation.enabled, "secure_aggregation.mode",
                self.secure_aggregation.mode.value,
                "secagg_plus or ckks with privacy.distributed_dp: the hospitals share one noise "
                "only if the server sees no hospital's noisy sum alone")
        require(not self.privacy.central_dp.enabled, key, chosen,
                "another mechanism with privacy.central_dp (client-level DP clips adapter "
                "updates; distributed DP sends noisy gradient shares)")
        require(self.train.lr_schedule == LearningRateSchedule.constant, "train.lr_schedule",
                self.train.lr_schedule.value, "constant with privacy=distributed_dp (its rounds "
                "take no local optimizer steps; the server's optimiser sets the step)")
        require(self.strategy.name in (StrategyName.fedadam, StrategyName.fedyogi,
                                       StrategyName.fedavg, StrategyName.fedavgm),
                "strategy.name", self.strategy.name.value,
                "fedadam (default of privacy=distributed_dp), fedyogi, fedavgm or fedavg: the "
                "server's optimiser steps on the noisy gradient")

    def _check_secure_aggregation(self) -> None:
        mode = self.secure_aggregation.mode
        if mode == SecureAggregationMode.none:
            return
        require(self.strategy.name not in NEEDS_INDIVIDUAL_UPDATES, "strategy.name",
                self.strategy.name.value,
                f"a strategy that aggregates the sum with secure_aggregation={mode.value}: "
                f"{self.strategy.name.value} needs every hospital's own update (to rank, trim "
                "or take medians), which secure aggregation hides from the server; use "
                "fedavg, fedprox, fedadam, fedyogi or fedavgm")
        threshold = self.secure_aggregation.reconstruction_threshold
        if threshold is not None:
            require(self.strategy.min_hospitals >= threshold, "strategy.min_hospitals",
                    self.strategy.min_hospitals,
                    f"at least secure_aggregation.reconstruction_threshold ({threshold}): "
                    "a round with fewer hospitals cannot release its sum")


# conf/config.yaml names this schema first in its defaults list: every default is the
# dataclasses', and the YAML files only hold presets.
ConfigStore.instance().store(name=SCHEMA_NAME, node=RunSettings)
