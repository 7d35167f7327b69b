"""Hydra composes the run's configuration from the typed schema and the presets in ``conf/``.

The dataclasses (``clinical_fl/settings/run.py::RunSettings`` and the sections it holds) are the one
schema and hold every default; they are registered in Hydra's ConfigStore as ``run_settings``,
the first entry of ``conf/config.yaml``'s defaults list, so the YAML files only keep
presets that differ (a model, a data source, a privacy level, a strategy, a sweep).
Every dataclass checks itself when built, so ``compose_config`` builds the settings
object once and returns it as a DictConfig: what the run logs is what it runs.

``flwr run`` has no Hydra entry point, so the ServerApp calls Hydra's compose
API on ``conf/`` with the overrides carried in the Flower run config.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.privacy import PrivacySettings
from clinical_fl.settings.run import RunSettings
from clinical_fl.settings.task import SharedSettings, TaskSettings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

__all__ = ["ConfigError", "RunSettings", "compose_config", "did_you_mean", "task_settings"]


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


def group_options(group: str) -> list[str]:
    """The options of a config group: its presets in ``conf/<group>/``, sorted."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """``" did you mean 'x'?"`` for the near misses of ``word`` among ``candidates`` (up to
    three, closest first), else ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=cutoff)
    return f" did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def schema_keys(node: DictConfig | None = None, parent: str = "") -> list[str]:
    """Every full key of the schema, sections and settings (``train``, ``train.local_epochs``)."""
    node = OmegaConf.structured(RunSettings) if node is None else node
    keys = []
    for name in node.keys():
        key = f"{parent}.{name}" if parent else str(name)
        keys.append(key)
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            keys += schema_keys(child, key)
    return keys


def _near_misses(key: str, section: DictConfig, parent: str) -> str:
    """Near misses of an unknown key: in its own section first, else a setting of that name
    (or nearly) in another section (``train.target_epsilon`` -> the privacy targets)."""
    leaf = key.rpartition(".")[2]
    here = difflib.get_close_matches(leaf, [str(k) for k in section.keys()], n=3, cutoff=0.6)
    found = [f"{parent}.{name}" if parent else name for name in here]
    if not found:
        by_leaf: dict[str, list[str]] = {}
        for full in schema_keys():
            by_leaf.setdefault(full.rpartition(".")[2], []).append(full)
        close = difflib.get_close_matches(leaf, list(by_leaf), n=2, cutoff=0.8)
        found = [full for name in close for full in by_leaf[name]][:3]
    return "; did you mean " + " or ".join(repr(f) for f in found) + "?" if found else ""


def _unknown_key(key: str, section: DictConfig, parent: str, why: str = "") -> ConfigError:
    where = f"in '{parent}'" if parent else "at the top level"
    return ConfigError(f"invalid configuration: unknown key '{key}'{why}; valid keys {where} "
                       f"are {sorted(section.keys())}{_near_misses(key, section, parent)}",
                       key=key)


def _unknown_option(group: str, option: str, written: str) -> ConfigError:
    """A group choice Hydra has no preset for (``privacy=dpsgd``)."""
    options = group_options(group)
    return ConfigError(
        f"invalid configuration: '{written}' chooses '{option}', which is not an option of "
        f"the config group '{group}' (no conf/{group}/{option}.yaml);"
        f"{did_you_mean(option, options)} valid options are {options}", key=group)


def _check_group_choice(override: str, group: str) -> None:
    """``group=option`` (also ``+group=``, a sweep's ``group=a,b``) names existing presets;
    ``model/nope=1`` names an existing group. Anything Hydra's parser cannot read, or a
    glob, is Hydra's to report."""
    groups = sorted(config_groups())
    if group not in groups:
        raise ConfigError(f"invalid configuration: '{override}' names the config group "
                          f"'{group}', which does not exist;{did_you_mean(group, groups)} the "
                          f"config groups are {groups}", key=group)
    try:
        parsed = OverridesParser.create().parse_override(override)
    except OverrideParseException:
        return
    if parsed.is_delete():
        return
    value = parsed.value()
    choices = value.list if isinstance(value, ChoiceSweep) else [value]
    options = group_options(group)
    for choice in choices:
        if isinstance(choice, str) and choice not in options:
            raise _unknown_option(group, choice, override)


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
        if key.split(".", 1)[0] == "hydra" or path.split("/", 1)[0] == "hydra":
            continue  # Hydra's own settings: Hydra checks them
        if "." not in path and (path in groups or "/" in path):
            if not prefix.startswith("~"):
                _check_group_choice(override, path)
            continue  # a group choice, addition or deletion
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
        if isinstance(err, ConfigKeyError) and key:
            # A key the schema lacks (in a preset, or a config built by hand): name the valid
            # keys of its section and the near misses, as for an override.
            try:
                _schema_has(OmegaConf.structured(RunSettings), str(key))
            except ConfigError as unknown:
                raise unknown from err
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
        mechanism=run.privacy.mechanism, dp_sgd=run.privacy.dp_sgd,
        distributed_dp=run.privacy.distributed_dp))


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
        key = str(getattr(err, "full_key", None) or "")
        if isinstance(err, ConfigKeyError) and key:
            # A key this hospital's schema lacks (a server of another version): the valid
            # keys of its section and the near misses, for the hospital's own log.
            try:
                _schema_has(OmegaConf.structured(TaskSettings), key)
            except ConfigError as unknown:
                raise ConfigError(f"settings from the server are invalid: {unknown}",
                                  key=key) from err
        # The key only: a hospital refusing these settings sends back ConfigError.key.
        raise ConfigError(f"settings from the server are invalid: {err}", key=key) from err
