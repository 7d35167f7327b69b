"""A hospital's own privacy policy: the limits the server cannot loosen.

The policy lives on the hospital's side only: a ``privacy-policy.toml`` file in
its state directory (works in simulation and deployment) and/or keys of the
same names in its SuperNode node config. Where both set a key, the stricter
value holds. The server's configuration never reaches it.

Keys:
- ``max-epsilon``: the lifetime budget, across every run (see ``ledger.py``);
- ``max-delta``: the largest delta the hospital accepts, and the delta its
  lifetime epsilon is measured at (default: min(1e-5, 1/(10 x records)));
- ``require-dp``: refuse training without DP-SGD (true whenever max-epsilon is set);
- ``eval-metrics``: what evaluation it releases: ``full`` (with per-class
  counts), ``aggregate`` (accuracy, loss, macro-F1; the default under DP-SGD),
  ``none`` (record counts only);
- ``distributed-dp-noise-floor``: under distributed DP, the least noise multiplier of the
  hospital's own share (in units of C / B, like sigma), whatever the run's threshold: its
  protection should others omit their noise (``tasks/privacy/distributed_dp.py``);
- ``min-secure-sum``: the fewest hospitals in any sum of secure aggregation this hospital's
  update goes into (the round's threshold t), whatever the server chooses; at least 2.

The hospital's data mapping and release rules (``tasks/data/mapping.py`` applies them):
``data-path``, ``text-column``, ``label-column``, ``site-column``, ``split-column``,
``eval-fraction``, ``deid`` (``required``, the default, or ``allowed``) and
``max-evaluations`` (evaluations answered per run; default: what the server planned). A
hospital owns its mapping when it is deployed (node config) or has a policy file; a
simulated hospital without one takes the server's mapping.

A node config key that looks like one of these spelled another way (``max_epsilon``,
``Require-DP``) is an error: a typo must not leave the hospital without its policy.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from tasks.errors import TaskInputError

POLICY_FILE = "privacy-policy.toml"


class PolicyError(TaskInputError):
    """A policy value is of the wrong type or out of range."""


class EvalRelease(Enum):
    full = "full"
    aggregate = "aggregate"
    none = "none"


class Deid(Enum):
    required = "required"  # the server cannot switch de-identification off
    allowed = "allowed"  # the server's data.deid.enabled holds


_STRICTNESS = {EvalRelease.full: 0, EvalRelease.aggregate: 1, EvalRelease.none: 2}
PRIVACY_KEYS = ("max-epsilon", "max-delta", "require-dp", "eval-metrics",
                "distributed-dp-noise-floor", "min-secure-sum")
# The hospital's data mapping: policy key -> the data setting it fixes.
MAPPING_KEYS = {"data-path": "path", "text-column": "text_column",
                "label-column": "label_column", "site-column": "site_column",
                "split-column": "split_column", "eval-fraction": "eval_fraction"}
RELEASE_KEYS = ("deid", "max-evaluations")
KEYS = (*PRIVACY_KEYS, *MAPPING_KEYS, *RELEASE_KEYS)
# Node config keys that are not policy: where the hospital runs and keeps its state.
NODE_KEYS = ("partition-id", "num-partitions", "state-dir", "ckks-context", "fault-drill",
             "secagg-signing-key", "secagg-roster")


def default_delta(train_records: int) -> float:
    """Well below 1/records: a delta near 1/n allows releasing a record outright."""
    return min(1e-5, 1.0 / (10 * train_records))


@dataclass(frozen=True)
class HospitalPolicy:
    hospital: int
    max_epsilon: float | None = None
    max_delta: float | None = None
    require_dp_setting: bool | None = None
    eval_metrics: EvalRelease | None = None
    source: str = "no policy"  # where it was read, for messages
    distributed_dp_noise_floor: float | None = None
    # Data setting name (DataSettings field) -> the hospital's value.
    data_mapping: dict[str, str | float] = field(default_factory=dict)
    deid: Deid | None = None
    max_evaluations: int | None = None
    # Deployed, or a policy file: the hospital's mapping and release rules hold, and
    # de-identification is required unless its policy says ``deid = "allowed"``.
    owns_data: bool = False
    min_secure_sum: int | None = None

    @property
    def data_path(self) -> str | None:
        path = self.data_mapping.get("path")
        return str(path) if path else None

    @property
    def deid_required(self) -> bool:
        return self.deid == Deid.required or (self.deid is None and self.owns_data)

    @property
    def require_dp(self) -> bool:
        return bool(self.require_dp_setting) or self.max_epsilon is not None

    def delta(self, train_records: int) -> float:
        """The hospital's delta: its max-delta, or the default for its record count."""
        return self.max_delta if self.max_delta is not None else default_delta(train_records)

    def check_records(self, train_records: int) -> None:
        """A max-delta at or above 1/records would let a record be released outright."""
        if self.max_delta is not None and self.max_delta >= 1.0 / max(train_records, 1):
            raise PolicyError(
                f"hospital {self.hospital}: privacy policy ({self.source}) key 'max-delta' is "
                f"{self.max_delta:g}, not below 1/records = 1/{train_records}; expected a "
                f"delta below {1 / max(train_records, 1):.3g} (e.g. 1e-5)", key="max-delta")

    def eval_release(self, dp_sgd: bool) -> EvalRelease:
        if self.eval_metrics is not None:
            return self.eval_metrics
        return EvalRelease.aggregate if dp_sgd or self.require_dp else EvalRelease.full


def _number(value: object, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PolicyError(f"{where}: key '{key}' must be a number, got {value!r}", key=key)
    try:
        number = float(value)
    except ValueError:
        raise PolicyError(f"{where}: key '{key}' must be a number, got {value!r}",
                          key=key) from None
    if not math.isfinite(number) or number <= 0:
        raise PolicyError(f"{where}: key '{key}' must be a finite number > 0, got {value!r}",
                          key=key)
    return number


def _flag(value: object, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PolicyError(f"{where}: key '{key}' must be true or false, got {value!r}", key=key)


def _text(value: object, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{where}: key '{key}' must be a non-empty string, got {value!r}",
                          key=key)
    return value


def _data_mapping(values: Mapping[str, object], where: str) -> dict[str, str | float]:
    mapping: dict[str, str | float] = {}
    for key, setting in MAPPING_KEYS.items():
        if values.get(key) in (None, ""):
            continue
        if key == "eval-fraction":
            fraction = _number(values[key], key, where)
            if not fraction < 1:
                raise PolicyError(f"{where}: key '{key}' must be in (0, 1), got {fraction:g}",
                                  key=key)
            mapping[setting] = fraction
        else:
            mapping[setting] = _text(values[key], key, where)
    return mapping


def _release_rules(values: Mapping[str, object], where: str) -> tuple[Deid | None, int | None]:
    deid = max_evaluations = None
    if values.get("deid") not in (None, ""):
        try:
            deid = Deid(str(values["deid"]))
        except ValueError:
            raise PolicyError(f"{where}: key 'deid' must be one of {[d.value for d in Deid]}, "
                              f"got {values['deid']!r}", key="deid") from None
    if values.get("max-evaluations") not in (None, ""):
        number = _number(values["max-evaluations"], "max-evaluations", where)
        if number != int(number):
            raise PolicyError(f"{where}: key 'max-evaluations' must be a whole number, got "
                              f"{values['max-evaluations']!r}", key="max-evaluations")
        max_evaluations = int(number)
    return deid, max_evaluations


def parse_policy(values: Mapping[str, object], hospital: int, source: str) -> HospitalPolicy:
    """Validate one source of policy keys (an unknown key is an error: a typo must not
    silently drop a limit)."""
    where = f"hospital {hospital}: privacy policy ({source})"
    unknown = sorted(k for k in values if k not in KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {unknown}; expected some of {list(KEYS)}",
                          key=_look_alike(unknown[0]) or "")
    max_epsilon = max_delta = require_dp = eval_metrics = noise_floor = None
    if values.get("max-epsilon") not in (None, ""):
        max_epsilon = _number(values["max-epsilon"], "max-epsilon", where)
    if values.get("max-delta") not in (None, ""):
        max_delta = _number(values["max-delta"], "max-delta", where)
        if max_delta >= 1:
            raise PolicyError(f"{where}: key 'max-delta' must be below 1, got {max_delta:g}",
                              key="max-delta")
    if values.get("require-dp") not in (None, ""):
        require_dp = _flag(values["require-dp"], "require-dp", where)
        if max_epsilon is not None and not require_dp:
            raise PolicyError(f"{where}: key 'require-dp' is false but max-epsilon is set; a "
                              "budget is only kept under DP-SGD (drop require-dp or set true)",
                              key="require-dp")
    if values.get("eval-metrics") not in (None, ""):
        try:
            eval_metrics = EvalRelease(str(values["eval-metrics"]))
        except ValueError:
            raise PolicyError(
                f"{where}: key 'eval-metrics' must be one of "
                f"{[e.value for e in EvalRelease]}, got {values['eval-metrics']!r}",
                key="eval-metrics") from None
    if values.get("distributed-dp-noise-floor") not in (None, ""):
        noise_floor = _number(values["distributed-dp-noise-floor"],
                              "distributed-dp-noise-floor", where)
    deid, max_evaluations = _release_rules(values, where)
    return HospitalPolicy(hospital, max_epsilon, max_delta, require_dp, eval_metrics, source,
                          noise_floor, _data_mapping(values, where), deid, max_evaluations,
                          min_secure_sum=_min_secure_sum(values, where))


def _min_secure_sum(values: Mapping[str, object], where: str) -> int | None:
    value = values.get("min-secure-sum")
    if value in (None, ""):
        return None
    number = _number(value, "min-secure-sum", where)
    if number != int(number) or number < 2:
        raise PolicyError(f"{where}: key 'min-secure-sum' must be a whole number of hospitals, "
                          f"at least 2, got {value!r}", key="min-secure-sum")
    return int(number)


def _stricter(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _same_mapping(first: HospitalPolicy, second: HospitalPolicy) -> dict[str, str | float]:
    """A data mapping given in both places must agree: there is no stricter column."""
    for setting in set(first.data_mapping) & set(second.data_mapping):
        if first.data_mapping[setting] != second.data_mapping[setting]:
            key = next(k for k, v in MAPPING_KEYS.items() if v == setting)
            raise PolicyError(f"hospital {first.hospital}: key '{key}' is "
                              f"{first.data_mapping[setting]!r} in {first.source} and "
                              f"{second.data_mapping[setting]!r} in {second.source}; give it "
                              "once", key=key)
    return {**first.data_mapping, **second.data_mapping}


def combine(first: HospitalPolicy, second: HospitalPolicy) -> HospitalPolicy:
    """Both sources hold: the tighter budget and delta, DP if either asks, the lesser release,
    de-identification required if either requires it, the fewer evaluations."""
    release = [r for r in (first.eval_metrics, second.eval_metrics) if r is not None]
    require = [r for r in (first.require_dp_setting, second.require_dp_setting) if r is not None]
    deid = [d for d in (first.deid, second.deid) if d is not None]
    evaluations = _stricter(first.max_evaluations, second.max_evaluations)
    return HospitalPolicy(
        hospital=first.hospital,
        max_epsilon=_stricter(first.max_epsilon, second.max_epsilon),
        max_delta=_stricter(first.max_delta, second.max_delta),
        require_dp_setting=any(require) if require else None,
        eval_metrics=max(release, key=_STRICTNESS.get) if release else None,
        distributed_dp_noise_floor=max((f for f in (first.distributed_dp_noise_floor,
                                                    second.distributed_dp_noise_floor)
                                        if f is not None), default=None),
        source=" + ".join(s for s in (first.source, second.source) if s != "no policy")
        or "no policy",
        data_mapping=_same_mapping(first, second),
        deid=(Deid.required if Deid.required in deid else Deid.allowed) if deid else None,
        max_evaluations=None if evaluations is None else int(evaluations),
        owns_data=first.owns_data or second.owns_data,
        min_secure_sum=max((n for n in (first.min_secure_sum, second.min_secure_sum)
                            if n is not None), default=None))


def _look_alike(key: str) -> str | None:
    """The policy key ``key`` looks like (another spelling of it), if any."""
    known = (*KEYS, *NODE_KEYS)
    if key in known:
        return None
    spelled = key.strip().lower().replace("_", "-").replace(" ", "-")
    if spelled in KEYS:
        return spelled
    close = difflib.get_close_matches(spelled, KEYS, n=1, cutoff=0.85)
    return close[0] if close else None


def check_node_config_spelling(node_config: Mapping[str, object], hospital: int) -> None:
    """A node config key that is a policy key spelled another way leaves the hospital
    without that limit: refuse to start work instead."""
    for key in node_config:
        meant = _look_alike(str(key))
        if meant is not None:
            raise PolicyError(f"hospital {hospital}: node config key {key!r} looks like the "
                              f"policy key {meant!r} spelled another way; write it as "
                              f"{meant!r} (a misspelled key would leave this hospital without "
                              "that limit)", key=meant)


def load_policy(state_dir: Path, node_config: Mapping[str, object],
                hospital: int, deployed: bool = False) -> HospitalPolicy:
    """The hospital's policy from its state directory's file and its node config.
    ``deployed``: the hospital owns its data mapping even without a policy file."""
    check_node_config_spelling(node_config, hospital)
    policy = HospitalPolicy(hospital, owns_data=deployed)
    path = Path(state_dir) / POLICY_FILE
    if path.exists():
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(f"hospital {hospital}: privacy policy {path} is not valid TOML "
                              f"({err})") from err
        from_file = parse_policy(values, hospital, str(path))
        policy = combine(policy, HospitalPolicy(**{**from_file.__dict__, "owns_data": True}))
    from_node = {k: v for k, v in node_config.items() if k in KEYS}
    if from_node:
        policy = combine(policy, parse_policy(from_node, hospital, "node config"))
    return policy
