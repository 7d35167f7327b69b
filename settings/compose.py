"""Hydra composes the run's configuration from the typed schema and the presets in ``conf/``.

The dataclasses (``RunSettings`` and the sections it holds) are the one schema and
hold every default; they are registered in Hydra's ConfigStore as ``run_settings``,
the first entry of ``conf/config.yaml``'s defaults list, so the YAML files only keep
presets that differ (a model, a data source, a privacy level, a strategy, a sweep).
Every dataclass checks itself when built, so ``compose_config`` builds the settings
object once and returns it as a DictConfig: what the run logs is what it runs.

``flwr run`` has no Hydra entry point, so the ServerApp calls Hydra's compose
API on ``conf/`` with the overrides carried in the Flower run config.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from strategies.strategy_settings import CentralDpSettings, StrategyName, StrategySettings
from tasks.errors import ConfigError
from tasks.task_settings import (
    AuditSettings,
    DataSettings,
    DpSgdSettings,
    ModelSettings,
    PrivacySettings,
    TaskSettings,
    TrainSettings,
    require,
)
from tracking.tracking_settings import TrackingSettings

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMA_NAME = "run_settings"

__all__ = ["ConfigError", "RunSettings", "compose_config", "task_settings"]


@dataclass
class RunPrivacySettings:
    """``conf/privacy/``: record-level DP in the hospitals, client-level DP on the server."""

    dp_sgd: DpSgdSettings = field(default_factory=DpSgdSettings)
    central_dp: CentralDpSettings = field(default_factory=CentralDpSettings)


@dataclass
class RunSettings:
    """Everything a run is configured by; checks that span sections live here."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: RunPrivacySettings = field(default_factory=RunPrivacySettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    num_rounds: int = 4
    seed: int = 42

    def __post_init__(self) -> None:
        require(self.num_rounds >= 1, "num_rounds", self.num_rounds, "at least 1")
        strategy = self.strategy
        if self.privacy.dp_sgd.enabled:
            require(strategy.name != StrategyName.fedprox or strategy.proximal_mu == 0,
                    "strategy.proximal_mu", strategy.proximal_mu, "0 with privacy.dp_sgd: "
                    "FedProx's proximal term is not part of the DP-SGD analysis")
        if self.privacy.central_dp.enabled:
            require(strategy.name == StrategyName.fedavg, "strategy.name", strategy.name.value,
                    "fedavg with privacy.central_dp: Flower's DP accountant requires FedAvg's "
                    "aggregation")
            require(strategy.fraction_train == 1.0, "strategy.fraction_train",
                    strategy.fraction_train, "1.0 with privacy.central_dp: its noise is "
                    "calibrated to every hospital in every round")


ConfigStore.instance().store(name=SCHEMA_NAME, node=RunSettings)


def parse_overrides(text: str) -> list[str]:
    """``"train.local_epochs=2 model.lora.r=16"`` -> Hydra override list."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"cannot parse overrides {text!r}: {err}") from err


def _check_override_keys(overrides: list[str]) -> None:
    """Name the unknown key and the valid ones (Hydra only says it cannot override)."""
    schema = OmegaConf.structured(RunSettings)
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.startswith(("+", "~", "hydra")) or "." not in key:
            continue  # group choices and additions are checked by Hydra itself
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent, default=None)
        if isinstance(node, DictConfig) and leaf not in node.keys():
            raise ConfigError(f"invalid configuration: unknown key '{key}'; valid keys in "
                              f"'{parent}' are {sorted(node.keys())}")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides into checked, resolved settings."""
    _check_override_keys(list(overrides or []))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name="config", overrides=list(overrides or []))
    except HydraException as err:
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            # A value of the wrong type for the schema: name the key, not only the override.
            raise ConfigError(f"invalid configuration at '{cause.full_key}': "
                              f"{getattr(cause, 'msg', None) or cause}") from err
        raise ConfigError(f"invalid configuration: {err}") from err
    return validate_config(composed)


def validate_config(composed: DictConfig) -> DictConfig:
    """Type-check against the schema and build the settings (each dataclass checks its own
    values); errors name the full key and what was expected."""
    try:
        OmegaConf.resolve(composed)
        merged = OmegaConf.merge(OmegaConf.structured(RunSettings), composed)
        settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        detail = getattr(err, "msg", None) or str(err)
        raise ConfigError(f"invalid configuration at '{key}': {detail}") from err
    except ConfigError:
        raise
    except ValueError as err:  # from a dataclass outside tasks/ (strategies/)
        raise ConfigError(str(err)) from err
    # Hydra's own node (hydra.*) is not part of the settings; sweeps read it from the
    # composed config, not from here.
    return OmegaConf.structured(settings)


def to_run_settings(cfg: DictConfig) -> RunSettings:
    return OmegaConf.to_object(cfg)


def task_settings(cfg: DictConfig, labels: list[str]) -> TaskSettings:
    """The part of the run's settings a hospital needs, with the global label set fixed."""
    return TaskSettings(model=OmegaConf.to_object(cfg.model),
                        data=replace(OmegaConf.to_object(cfg.data), labels=list(labels)),
                        train=OmegaConf.to_object(cfg.train),
                        privacy=PrivacySettings(dp_sgd=OmegaConf.to_object(cfg.privacy.dp_sgd)),
                        audit=OmegaConf.to_object(cfg.audit), seed=cfg.seed)


def task_settings_to_yaml(settings: TaskSettings) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(settings))


def task_settings_from_yaml(text: str) -> TaskSettings:
    """What a hospital does with the server's settings: parse and validate them again."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TaskSettings), OmegaConf.create(text))
    except OmegaConfBaseException as err:
        raise ConfigError(f"settings from the server are invalid: {err}") from err
    return OmegaConf.to_object(merged)
