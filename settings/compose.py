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
        # No setting key: the override string as a whole cannot be read.
        raise ConfigError(f"cannot parse overrides {text!r}: {err}", key="") from err


def config_groups() -> frozenset[str]:
    """The config groups: the folders of ``conf/`` (``privacy``, ``sweep``, ...)."""
    return frozenset(path.name for path in CONF_DIR.iterdir() if path.is_dir())


def _unknown_key(key: str, section: DictConfig, parent: str, why: str = "") -> ConfigError:
    where = f"in '{parent}'" if parent else "at the top level"
    return ConfigError(f"invalid configuration: unknown key '{key}'{why}; valid keys {where} "
                       f"are {sorted(section.keys())}", key=key)


def _schema_has(schema: DictConfig, key: str) -> None:
    """Fail naming ``key`` and the valid keys of its section unless the schema holds it."""
    node: object = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return  # inside a value (a list): Hydra and the schema's types check it
        if part not in node.keys():
            raise _unknown_key(".".join(parts[:depth + 1]), node, ".".join(parts[:depth]))
        node = node._get_node(part)


def check_override_keys(overrides: list[str]) -> None:
    """Every override names a key of the schema or a config group; Hydra would say only that
    it cannot override, or, for ``+key``, add a key the settings then drop without a word.

    ``key=value`` and ``++key=value`` must name a schema key; ``+key=value`` (an addition)
    and ``~key`` (a deletion) are refused unless ``key`` is a config group (``+sweep=epsilon``,
    ``~privacy``): the schema holds every key with its default, so there is nothing to add and
    nothing to delete. Hydra's own settings (``hydra.*``) are Hydra's to check."""
    schema = OmegaConf.structured(RunSettings)
    groups = config_groups()
    for override in overrides:
        written = override.split("=", 1)[0].strip()
        key = written.lstrip("+~")
        prefix = written[:len(written) - len(key)]
        path = key.split("@", 1)[0]  # a group may name its package: group@package=option
        if key.split(".", 1)[0] == "hydra" or (
                "." not in path and path.split("/", 1)[0] in {*groups, "hydra"}):
            continue  # a group choice, addition or deletion, or Hydra's own: Hydra checks it
        if prefix.startswith("~"):
            raise ConfigError(
                f"invalid configuration: '{written}' would delete '{key}', which is not a "
                f"config group ({sorted(groups)}); every setting has a default in the schema: "
                f"set it instead ({key}=...)", key=key)
        if prefix == "+":
            parent, _, leaf = key.rpartition(".")
            if parent:
                _schema_has(schema, parent)
            section = OmegaConf.select(schema, parent) if parent else schema
            if not isinstance(section, DictConfig):
                raise ConfigError(f"invalid configuration: '{written}' adds '{key}', but "
                                  f"'{parent}' is a setting, not a section", key=key)
            if leaf not in section.keys():
                raise _unknown_key(key, section, parent, " ('+' adds a key to the settings, "
                                   "and their schema takes no additions)")
            raise ConfigError(f"invalid configuration: '{written}' adds '{key}', which the "
                              f"schema already has: write {key}=... without the '+'", key=key)
        _schema_has(schema, key)  # key=value, ++key=value


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides into checked, resolved settings."""
    check_override_keys(list(overrides or []))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            composed = compose(config_name="config", overrides=list(overrides or []))
    except HydraException as err:
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
            # A value of the wrong type for the schema: name the key, not only the override.
            raise ConfigError(f"invalid configuration at '{cause.full_key}': "
                              f"{getattr(cause, 'msg', None) or cause}",
                              key=str(cause.full_key)) from err
        raise ConfigError(f"invalid configuration: {err}", key="") from err
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
        raise ConfigError(f"invalid configuration at '{key}': {detail}",
                          key=str(key or "")) from err
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
        # Building the dataclasses runs their checks (a ConfigError naming its key); a value
        # left missing (???) fails here too.
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        # The key only: a hospital refusing these settings sends back ConfigError.key.
        raise ConfigError(f"settings from the server are invalid: {err}",
                          key=str(getattr(err, "full_key", None) or "")) from err
