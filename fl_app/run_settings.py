"""Hydra composes the run's configuration; a typed schema validates it before any work starts.

``flwr run`` has no Hydra entry point, so the ServerApp calls Hydra's compose
API on ``conf/`` with the overrides carried in the Flower run config.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from strategies.strategy_settings import CentralDpSettings, StrategySettings
from tasks.task_settings import (
    AuditSettings,
    DataSettings,
    DataSource,
    DpSgdSettings,
    ModelSettings,
    Partitioning,
    PrivacySettings,
    TaskSettings,
    TrainSettings,
)
from tracking.tracking_settings import TrackingSettings

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """The configuration names a key, group option or value that is not valid."""


@dataclass
class RunPrivacySettings:
    """``conf/privacy/``: record-level DP in the hospitals, client-level DP on the server."""

    dp_sgd: DpSgdSettings = field(default_factory=DpSgdSettings)
    central_dp: CentralDpSettings = field(default_factory=CentralDpSettings)


@dataclass
class RunSettings:
    """The schema of ``conf/config.yaml`` after composition."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: RunPrivacySettings = field(default_factory=RunPrivacySettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    num_rounds: int = 3
    seed: int = 42


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
    """Compose ``conf/config.yaml`` with overrides and check it against ``RunSettings``."""
    _check_override_keys(list(overrides or []))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name="config", overrides=list(overrides or []))
    except HydraException as err:
        raise ConfigError(f"invalid configuration: {err}") from err
    return validate_config(composed)


def validate_config(composed: DictConfig) -> DictConfig:
    """Type-check against the schema; errors name the full key and what was expected."""
    schema = OmegaConf.structured(RunSettings)
    try:
        OmegaConf.resolve(composed)
        merged = OmegaConf.merge(schema, composed)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        detail = getattr(err, "msg", None) or str(err)
        raise ConfigError(f"invalid configuration at '{key}': {detail}") from err
    _check_values(merged)
    return merged


def _check_values(cfg: DictConfig) -> None:
    checks = [
        ("num_rounds", cfg.num_rounds >= 1, "at least 1"),
        ("train.local_epochs", cfg.train.local_epochs >= 1, "at least 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "at least 1"),
        ("train.eval_batch_size", cfg.train.eval_batch_size >= 1, "at least 1"),
        ("train.learning_rate", cfg.train.learning_rate > 0, "greater than 0"),
        ("train.head_learning_rate",
         cfg.train.get("head_learning_rate") is None or cfg.train.head_learning_rate > 0,
         "greater than 0, or null (train.learning_rate for the head too)"),
        ("model.max_length", cfg.model.max_length >= 8, "at least 8"),
        ("model.lora.r", cfg.model.lora.r >= 1, "at least 1"),
        ("model.lora.dropout", 0 <= cfg.model.lora.dropout < 1, "in [0, 1)"),
        ("data.eval_fraction", 0 < cfg.data.eval_fraction < 1, "in (0, 1)"),
        ("data.notes_per_hospital", cfg.data.notes_per_hospital >= 0, "at least 0"),
        ("data.label_noise", 0 <= cfg.data.label_noise < 1, "in [0, 1)"),
        ("data.label_skew_alpha", cfg.data.label_skew_alpha > 0, "greater than 0"),
        ("strategy.min_hospitals", cfg.strategy.min_hospitals >= 1, "at least 1"),
        ("strategy.fraction_train", 0 < cfg.strategy.fraction_train <= 1, "in (0, 1]"),
        ("strategy.fraction_evaluate", 0 < cfg.strategy.fraction_evaluate <= 1, "in (0, 1]"),
        ("audit.canary_norm", cfg.audit.canary_norm is None or cfg.audit.canary_norm > 0,
         "greater than 0, or null (the DP-SGD clipping norm)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"invalid configuration at '{key}': got "
                              f"{OmegaConf.select(cfg, key)!r}, expected {expected}")
    _check_privacy(cfg)
    _check_data(cfg)
    labels = cfg.data.labels
    if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
        raise ConfigError(f"invalid configuration at 'data.labels': got {list(labels)}, "
                          "expected at least 2 distinct labels")


def _check_data(cfg: DictConfig) -> None:
    data = cfg.data
    source, partitioning = DataSource(data.source), Partitioning(data.partitioning)
    if source != DataSource.synthetic and not data.path and not data.labels:
        # In deployment the server reads no hospital data: each hospital's node config names
        # its own file (data-path), and the label set must then be given.
        raise ConfigError(f"invalid configuration at 'data.path': data.source={source.value} "
                          "needs a path (file, glob of parts, folder, or dataset id), or, in a "
                          "deployment where each hospital reads its own data-path, data.labels")
    if partitioning == Partitioning.size and data.size_skew <= 0:
        raise ConfigError(f"invalid configuration at 'data.size_skew': got {data.size_skew!r}, "
                          "expected greater than 0 with data.partitioning=size")
    if (partitioning == Partitioning.natural and source != DataSource.synthetic
            and not data.site_column):
        raise ConfigError("invalid configuration at 'data.site_column': data.partitioning="
                          "natural needs the column that names each record's hospital")


def _check_privacy(cfg: DictConfig) -> None:
    """Privacy settings that are wrong whatever the hospital's data; the hospital checks the
    rest (delta against its record count, a budget too small for one round) in preflight."""
    def fail(key: str, expected: str) -> None:
        raise ConfigError(f"invalid configuration at '{key}': got "
                          f"{OmegaConf.select(cfg, key)!r}, {expected}")

    dp, central = cfg.privacy.dp_sgd, cfg.privacy.central_dp
    if dp.enabled:
        if (dp.target_epsilon is None) == (dp.noise_multiplier is None):
            raise ConfigError(
                "invalid configuration at 'privacy.dp_sgd': give exactly one of target_epsilon "
                f"(got {dp.target_epsilon!r}) and noise_multiplier (got "
                f"{dp.noise_multiplier!r}): the noise is either calibrated or fixed")
        if dp.target_epsilon is not None and not dp.target_epsilon > 0:
            fail("privacy.dp_sgd.target_epsilon", "expected > 0 (.inf: no DP-SGD)")
        if dp.noise_multiplier is not None and not dp.noise_multiplier > 0:
            fail("privacy.dp_sgd.noise_multiplier", "expected > 0 (use privacy=none for none)")
        if dp.target_delta is not None and not 0 < dp.target_delta < 1:
            fail("privacy.dp_sgd.target_delta", "expected in (0, 1)")
        if not dp.max_grad_norm > 0:
            fail("privacy.dp_sgd.max_grad_norm", "expected > 0")
        if dp.max_epsilon is not None and not dp.max_epsilon > 0:
            fail("privacy.dp_sgd.max_epsilon", "expected > 0")
        if cfg.strategy.proximal_mu > 0:
            fail("strategy.proximal_mu", "expected 0 with privacy.dp_sgd: FedProx's proximal "
                 "term is not part of the DP-SGD analysis")
    if central.enabled:
        if not central.noise_multiplier > 0:
            fail("privacy.central_dp.noise_multiplier", "expected > 0")
        if not central.clipping_norm > 0:
            fail("privacy.central_dp.clipping_norm", "expected > 0")
        if central.target_delta is not None and not 0 < central.target_delta < 1:
            fail("privacy.central_dp.target_delta", "expected in (0, 1)")
        if central.max_epsilon is not None and not central.max_epsilon > 0:
            fail("privacy.central_dp.max_epsilon", "expected > 0")
        if cfg.strategy.name.value != "fedavg":
            fail("strategy.name", "expected fedavg with privacy.central_dp: Flower's DP "
                 "accountant requires FedAvg's aggregation")
        if cfg.strategy.fraction_train != 1.0:
            fail("strategy.fraction_train", "expected 1.0 with privacy.central_dp: its noise is "
                 "calibrated to every hospital in every round")


def to_run_settings(cfg: DictConfig) -> RunSettings:
    return OmegaConf.to_object(cfg)


def task_settings(cfg: DictConfig, labels: list[str]) -> TaskSettings:
    """The part of the run's settings a hospital needs, with the global label set fixed."""
    settings = TaskSettings(model=OmegaConf.to_object(cfg.model),
                            data=OmegaConf.to_object(cfg.data),
                            train=OmegaConf.to_object(cfg.train),
                            privacy=PrivacySettings(
                                dp_sgd=OmegaConf.to_object(cfg.privacy.dp_sgd)),
                            audit=OmegaConf.to_object(cfg.audit), seed=cfg.seed)
    settings.data.labels = list(labels)
    return settings


def task_settings_to_yaml(settings: TaskSettings) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(settings))


def task_settings_from_yaml(text: str) -> TaskSettings:
    """What a hospital does with the server's settings: parse and validate them again."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TaskSettings), OmegaConf.create(text))
    except OmegaConfBaseException as err:
        raise ConfigError(f"settings from the server are invalid: {err}") from err
    return OmegaConf.to_object(merged)
