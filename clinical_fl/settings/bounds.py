"""Range checks that NaN and infinities cannot slip through, and the rule that a setting of a
mechanism that is switched off is an error, not silently ignored.

``x > 0`` is False for NaN but ``not (x <= 0)`` is True, and ``inf > 0`` holds: every check
here first asks for a finite number (``math.isfinite``), so a bad value fails whichever way
the comparison is written. A hospital parses the server's settings with the same dataclasses,
so these checks protect the hospital as well as catch the operator's typos.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import MISSING, fields
from typing import Any

from clinical_fl.settings.checks import ConfigError, require

# Integer settings that count things (thresholds, hospitals) stop here: far above any real
# federation, far below what would overflow an allocation or a loop.
MAX_HOSPITALS = 10_000


def is_real(value: Any) -> bool:
    """A number, not a bool (``True`` is 1 to Python, never to a setting)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_real(value) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_positive(value: Any, key: str, note: str = "") -> None:
    """Finite and > 0 (learning rates, noise multipliers, clipping norms, epsilons)."""
    require(is_finite(value) and value > 0, key, value, f"greater than 0 and finite{note}")


def require_non_negative(value: Any, key: str, note: str = "") -> None:
    require(is_finite(value) and value >= 0, key, value, f"at least 0 and finite{note}")


def require_open_unit(value: Any, key: str, note: str = "") -> None:
    """In (0, 1): a delta, a dropout-like share."""
    require(is_finite(value) and 0 < value < 1, key, value, f"in (0, 1){note}")


def require_rate(value: Any, key: str, note: str = "") -> None:
    """In (0, 1]: a sampling rate."""
    require(is_finite(value) and 0 < value <= 1, key, value, f"in (0, 1]{note}")


def require_count(value: Any, key: str, low: int, high: int, note: str = "") -> None:
    """An integer (not a bool) from ``low`` to ``high``."""
    require(is_integer(value) and low <= value <= high, key, value,
            f"an integer from {low} to {high:,}{note}")


def field_default(settings: Any, name: str) -> Any:
    for item in fields(settings):
        if item.name == name:
            return item.default_factory() if item.default is MISSING else item.default
    raise KeyError(name)


def require_defaults_while_off(settings: Any, section: str, switch: str | None, turn_on: str,
                               keep: tuple[str, ...] = (),
                               notes: dict[str, str] | None = None,
                               off_state: str | None = None) -> None:
    """Every field of a switched-off section must be its dataclass default.

    ``section`` is the section's full key, ``switch`` the field that switches it (left out of
    the comparison; None where a setting outside the section switches it, which
    ``off_state`` then names, e.g. ``privacy.mechanism=none``), ``turn_on`` the override
    that switches it on as the user types it. The fields in ``keep`` are left to the caller
    (a value another mechanism shares); ``notes`` adds a hint to a field's message."""
    for item in fields(settings):
        if item.name == switch or item.name in keep:
            continue
        value, default = getattr(settings, item.name), field_default(settings, item.name)
        if value == default and value == value:  # value == value: NaN differs from everything
            continue
        if off_state is None:
            shown = getattr(settings, switch)
            shown = getattr(shown, "value", shown)
            shown = str(shown).lower() if isinstance(shown, bool) else shown
            off_state = f"{section}.{switch}={shown}"
        key = f"{section}.{item.name}"
        raise ConfigError(
            f"invalid configuration at '{key}': got {value!r} while {off_state}: this setting "
            f"takes effect only with {turn_on}. Turn that on, or leave "
            f"'{key}' at its default ({getattr(default, 'value', default)!r})"
            f"{(notes or {}).get(item.name, '')}", key)
