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
  protection should others omit their noise (``tasks/privacy/distributed_dp.py``).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
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


_STRICTNESS = {EvalRelease.full: 0, EvalRelease.aggregate: 1, EvalRelease.none: 2}
KEYS = ("max-epsilon", "max-delta", "require-dp", "eval-metrics", "distributed-dp-noise-floor")


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
                f"delta below {1 / max(train_records, 1):.3g} (e.g. 1e-5)")

    def eval_release(self, dp_sgd: bool) -> EvalRelease:
        if self.eval_metrics is not None:
            return self.eval_metrics
        return EvalRelease.aggregate if dp_sgd or self.require_dp else EvalRelease.full


def _number(value: object, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PolicyError(f"{where}: key '{key}' must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise PolicyError(f"{where}: key '{key}' must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise PolicyError(f"{where}: key '{key}' must be a finite number > 0, got {value!r}")
    return number


def _flag(value: object, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PolicyError(f"{where}: key '{key}' must be true or false, got {value!r}")


def parse_policy(values: Mapping[str, object], hospital: int, source: str) -> HospitalPolicy:
    """Validate one source of policy keys (an unknown key is an error: a typo must not
    silently drop a limit)."""
    where = f"hospital {hospital}: privacy policy ({source})"
    unknown = sorted(k for k in values if k not in KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {unknown}; expected some of {list(KEYS)}")
    max_epsilon = max_delta = require_dp = eval_metrics = noise_floor = None
    if values.get("max-epsilon") not in (None, ""):
        max_epsilon = _number(values["max-epsilon"], "max-epsilon", where)
    if values.get("max-delta") not in (None, ""):
        max_delta = _number(values["max-delta"], "max-delta", where)
        if max_delta >= 1:
            raise PolicyError(f"{where}: key 'max-delta' must be below 1, got {max_delta:g}")
    if values.get("require-dp") not in (None, ""):
        require_dp = _flag(values["require-dp"], "require-dp", where)
        if max_epsilon is not None and not require_dp:
            raise PolicyError(f"{where}: key 'require-dp' is false but max-epsilon is set; a "
                              "budget is only kept under DP-SGD (drop require-dp or set true)")
    if values.get("eval-metrics") not in (None, ""):
        try:
            eval_metrics = EvalRelease(str(values["eval-metrics"]))
        except ValueError:
            raise PolicyError(
                f"{where}: key 'eval-metrics' must be one of "
                f"{[e.value for e in EvalRelease]}, got {values['eval-metrics']!r}") from None
    if values.get("distributed-dp-noise-floor") not in (None, ""):
        noise_floor = _number(values["distributed-dp-noise-floor"],
                              "distributed-dp-noise-floor", where)
    return HospitalPolicy(hospital, max_epsilon, max_delta, require_dp, eval_metrics, source,
                          noise_floor)


def _stricter(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def combine(first: HospitalPolicy, second: HospitalPolicy) -> HospitalPolicy:
    """Both sources hold: the tighter budget and delta, DP if either asks, the lesser release."""
    release = [r for r in (first.eval_metrics, second.eval_metrics) if r is not None]
    require = [r for r in (first.require_dp_setting, second.require_dp_setting) if r is not None]
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
        or "no policy")


def load_policy(state_dir: Path, node_config: Mapping[str, object],
                hospital: int) -> HospitalPolicy:
    """The hospital's policy from its state directory's file and its node config."""
    policy = HospitalPolicy(hospital)
    path = Path(state_dir) / POLICY_FILE
    if path.exists():
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(f"hospital {hospital}: privacy policy {path} is not valid TOML "
                              f"({err})") from err
        policy = combine(policy, parse_policy(values, hospital, str(path)))
    from_node = {k: v for k, v in node_config.items() if k in KEYS}
    if from_node:
        policy = combine(policy, parse_policy(from_node, hospital, "node config"))
    return policy
