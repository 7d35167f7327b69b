"""The Flower run config (``[tool.flwr.app.config]`` in pyproject.toml) as Hydra overrides.

Flower's way to configure an app is typed keys, ``flwr run --run-config 'num-server-rounds=6
privacy="dp_sgd"'``; this project's configuration is Hydra's (``conf/`` and the schema in
``clinical_fl/settings/``). The run config therefore holds two kinds of key:

- ``TYPED_KEYS``: the settings people change most, one Hydra override each
  (``num-server-rounds=6`` is ``num_rounds=6``, ``privacy="dp_sgd"`` is ``privacy=dp_sgd``);
- ``overrides``: any Hydra overrides, as one string (``overrides='model.lora.r=16'``).

Precedence. Flower merges pyproject's defaults into the run config, so the ServerApp cannot
tell a key left alone from a key set to its default. So:

1. A typed key whose value equals its default (its pyproject value, which is the schema's or
   the presets' default: a test keeps them equal) is left out: it sets nothing, and the
   presets keep their own values (``privacy="dp_sgd"`` brings ``train.local_epochs=3``; an
   explicit ``local-epochs=1`` is therefore not seen: write ``overrides='train.local_epochs=1'``).
2. Every other typed key becomes its override, in ``TYPED_KEYS`` order, before the
   ``overrides`` string's.
3. A typed key and an ``overrides`` entry that set the same setting must agree: different
   values are an error naming both (nothing is silently overridden).

``data-path`` also chooses ``data=files`` unless ``overrides`` chooses a data preset (a path is
read only by file sources). ``target-epsilon`` is the target of the record-level mechanism the
run uses: ``privacy.distributed_dp.target_epsilon`` with ``privacy="distributed_dp"``, else
``privacy.dp_sgd.target_epsilon`` (which the schema refuses without DP-SGD, naming the key).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import (
    compose_config,
    did_you_mean,
    group_options,
    parse_overrides,
)

OVERRIDES_KEY = "overrides"


@dataclass(frozen=True)
class RunConfigKey:
    """One typed key of ``[tool.flwr.app.config]`` and the Hydra setting it overrides."""

    name: str  # the Flower key, kebab-case as in Flower's templates
    setting: str  # a schema key (``train.local_epochs``) or, with group, a config group
    default: int | float | str  # its value in pyproject.toml: the schema's or presets' default
    help: str
    group: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)


TYPED_KEYS: tuple[RunConfigKey, ...] = (
    RunConfigKey("num-server-rounds", "num_rounds", 4, "federated rounds"),
    RunConfigKey("local-epochs", "train.local_epochs", 1,
                 "epochs each hospital trains a round (privacy=\"dp_sgd\" brings 3)"),
    RunConfigKey("learning-rate", "train.learning_rate", 0.001, "AdamW's, for the LoRA matrices"),
    RunConfigKey("privacy", "privacy", "none", "privacy level: a preset of conf/privacy/",
                 group=True),
    RunConfigKey("target-epsilon", "privacy.dp_sgd.target_epsilon", 8.0,
                 "record-level epsilon (DP-SGD's, or distributed DP's); the presets' 8.0"),
    RunConfigKey("strategy", "strategy", "fedavg", "a preset of conf/strategy/", group=True),
    RunConfigKey("secure-aggregation", "secure_aggregation", "none",
                 "none, secagg_plus or ckks (conf/secure_aggregation/)", group=True),
    RunConfigKey("data-path", "data.path", "",
                 "your export (file, glob or folder); chooses data=files; \"\": synthetic"),
)
KEYS_BY_NAME = {key.name: key for key in TYPED_KEYS}
DISTRIBUTED_TARGET = "privacy.distributed_dp.target_epsilon"


def run_config_defaults() -> dict[str, int | float | str]:
    """What ``[tool.flwr.app.config]`` holds: every typed key's default, and ``overrides``."""
    return {**{key.name: key.default for key in TYPED_KEYS}, OVERRIDES_KEY: ""}


def hydra_value(value: int | float | str) -> str:
    """A value as a Hydra override writes it: numbers plain, strings quoted (a path may hold
    spaces, commas, ``*`` or quotes)."""
    if isinstance(value, str):
        # Hydra's quoted strings: backslashes are literal except before a quote.
        escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
        return "'" + escaped.replace("'", "\\'") + "'"
    return str(value)  # 4, 0.001, 1e-05, inf: Hydra reads them as Python writes them


def _typed_value(key: RunConfigKey, value: Any) -> int | float | str:
    """The value of a typed key checked against its type (Flower itself checks none)."""
    kind = key.kind
    ok = (isinstance(value, kind) and not isinstance(value, bool)) or (
        kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        example = (f"{key.name}={key.default}" if kind is not str
                   else f"{key.name}=\"{key.default or 'value'}\"")
        raise ConfigError(
            f"invalid run config '{key.name}': got {value!r} ({type(value).__name__}), expected "
            f"{ {int: 'an integer', float: 'a number', str: 'a string'}[kind]} "
            f"(--run-config '{example}')", key=key.setting)
    if key.group and value not in group_options(key.setting):
        options = group_options(key.setting)
        raise ConfigError(
            f"invalid run config '{key.name}': got {value!r};{did_you_mean(value, options)} "
            f"valid options are {options}", key=key.setting)
    return float(value) if kind is float else value


def _same(a: str, b: str) -> bool:
    """Whether two override values say the same (``3`` and ``3.0``, ``'x'`` and ``x``)."""
    a, b = a.strip().strip("'\""), b.strip().strip("'\"")
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def _written(overrides: list[str]) -> dict[str, str]:
    """Setting (or group) -> value, of the overrides that set one (``+``/``++`` stripped)."""
    written = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.strip().lstrip("+").split("@", 1)[0]
        if sep and not key.startswith("~"):
            written[key] = value
    return written


def typed_overrides(run_config: Mapping[str, Any],
                    overrides: list[str] | None = None) -> list[tuple[str, str]]:
    """(typed key, Hydra override) for every typed key that differs from its default, in
    ``TYPED_KEYS`` order; ``overrides`` (the ``overrides`` key's) decides data presets and
    the privacy level ``target-epsilon`` applies to."""
    overrides = overrides or []
    written = _written(overrides)
    chosen: list[tuple[str, str]] = []
    privacy = written.get("privacy", "").strip("'\"")
    for key in TYPED_KEYS:
        if key.name not in run_config:
            continue
        value = _typed_value(key, run_config[key.name])
        if value == key.default:
            continue
        setting = key.setting
        if key.name == "privacy":
            privacy = value
        if key.name == "target-epsilon" and privacy == "distributed_dp":
            setting = DISTRIBUTED_TARGET
        if key.name == "data-path" and "data" not in written:
            chosen.append((key.name, "data=files"))
        # A group option is a preset's name (checked above): written plain.
        written_value = value if key.group else hydra_value(value)
        chosen.append((key.name, f"{setting}={written_value}"))
    return chosen


def run_config_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides a Flower run config stands for: the typed keys that differ from
    their defaults, then the ``overrides`` string's (see the module's precedence rules)."""
    overrides = parse_overrides(str(run_config.get(OVERRIDES_KEY, "") or ""))
    typed = typed_overrides(run_config, overrides)
    written = _written(overrides)
    for name, override in typed:
        setting, _, value = override.partition("=")
        if setting in written and not _same(written[setting], value):
            raise ConfigError(
                f"invalid run config: '{name}' sets {setting}={value}, and 'overrides' sets "
                f"{setting}={written[setting]}: give it once", key=setting)
    return [override for _, override in typed] + overrides


def _typed_hint(err: ConfigError, run_config: Mapping[str, Any],
                typed: list[tuple[str, str]]) -> str:
    """Where a refused setting came from, when a typed key set it, or a typed key's name
    written inside ``overrides``."""
    for name, override in typed:
        setting = override.partition("=")[0]
        if err.key and (err.key == setting or err.key.startswith(f"{setting}.")):
            return f" (set by the run config's {name}={run_config[name]!r})"
    written = err.key.replace("_", "-")
    if err.key and written in KEYS_BY_NAME:
        return (f" ('{written}' is a run-config key of its own: --run-config "
                f"'{written}=...', not inside overrides)")
    return ""


def compose_run_config(run_config: Mapping[str, Any]) -> tuple[list[str], DictConfig]:
    """The overrides of a Flower run config and the checked configuration they compose to; an
    error a typed key caused names that key too."""
    overrides = run_config_overrides(run_config)
    try:
        return overrides, compose_config(overrides)
    except ConfigError as err:
        hint = _typed_hint(err, run_config, typed_overrides(
            run_config, parse_overrides(str(run_config.get(OVERRIDES_KEY, "") or ""))))
        if not hint:
            raise
        raise ConfigError(f"{err}{hint}", key=err.key) from err
