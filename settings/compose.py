"""Hydra composes the run's configuration from the typed schema and the presets in ``conf/``.

The dataclasses (``settings/run.py::RunSettings`` and the sections it holds) are the one
schema and hold every default; they are registered in Hydra's ConfigStore as ``run_settings``,
the first entry of ``conf/config.yaml``'s defaults list, so the YAML files only keep
presets that differ (a model, a data source, a privacy level, a strategy, a sweep).
Every dataclass checks itself when built, so ``compose_config`` builds the settings
object once and returns it as a DictConfig: what the run logs is what it runs.

``flwr run`` has no Hydra entry point, so the ServerApp calls Hydra's compose
API on ``conf/`` with the overrides carried in the Flower run config.
"""

from __future__ import annotations

import shlex
from dataclasses import fields, replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from settings.checks import ConfigError
from settings.run import RunSettings
from settings.task import PrivacySettings, SharedSettings, TaskSettings

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

__all__ = ["ConfigError", "RunSettings", "compose_config", "task_settings"]


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
    # Hydra's own node (hydra.*) is not part of the settings; sweeps read it from the
    # composed config, not from here.
    return OmegaConf.structured(settings)


def to_run_settings(cfg: DictConfig) -> RunSettings:
    return OmegaConf.to_object(cfg)


def task_settings(cfg: DictConfig, labels: list[str]) -> TaskSettings:
    """The part of the run's settings a hospital needs, with the global label set fixed."""
    run = to_run_settings(cfg)
    shared = {f.name: getattr(run, f.name) for f in fields(SharedSettings)}
    shared["data"] = replace(run.data, labels=list(labels))
    return TaskSettings(**shared, privacy=PrivacySettings(
        dp_sgd=run.privacy.dp_sgd, distributed_dp=run.privacy.distributed_dp))


def task_settings_to_yaml(settings: TaskSettings) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(settings))


def task_settings_from_yaml(text: str) -> TaskSettings:
    """What a hospital does with the server's settings: parse and validate them again."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TaskSettings), OmegaConf.create(text))
    except OmegaConfBaseException as err:
        raise ConfigError(f"settings from the server are invalid: {err}") from err
    return OmegaConf.to_object(merged)
