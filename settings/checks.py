"""How every settings dataclass checks itself when it is built (in ``__post_init__``, as
PEFT's ``LoraConfig`` does): a bad value fails naming the full key, the value given and
what was expected, whoever built the settings."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A setting names a key, group option or value that is not valid."""


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Fail naming the full key, the value given and what was expected."""
    if not ok:
        raise ConfigError(f"invalid configuration at '{key}': got {value!r}, expected {expected}")


def as_enum(enum: type[Enum], value: Any, key: str) -> Enum:
    """Settings built by hand may give an enum by its value (``"iid"``)."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"invalid configuration at '{key}': got {value!r}, expected one of "
                          f"{[member.value for member in enum]}") from None
