"""How every settings dataclass checks itself when it is built (in ``__post_init__``, as
PEFT's ``LoraConfig`` does): a bad value fails naming the full key, the value given and
what was expected, whoever built the settings."""

from __future__ import annotations

from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """A setting names a key, group option or value that is not valid.

    ``key`` is the full setting key it concerns ("" where none applies): a hospital refusing
    the server's settings sends back the key, never the message (it holds the value given).
    """

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Fail naming the full key, the value given and what was expected."""
    if not ok:
        raise ConfigError(f"invalid configuration at '{key}': got {value!r}, expected {expected}",
                          key)


def as_enum(enum: type[Enum], value: Any, key: str) -> Enum:
    """Settings built by hand may give an enum by its value (``"iid"``)."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"invalid configuration at '{key}': got {value!r}, expected one of "
                          f"{[member.value for member in enum]}", key) from None
