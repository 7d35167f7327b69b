"""Errors for bad input. Each message names the culprit and what was expected.

The message is for the hospital's own log and the operator who reads it: it may name a file,
a row or a value. What may leave a hospital is only ``key`` (the setting or policy key the
error concerns) and ``counts`` (named integers): ``clinical_fl/protocol/refusals.py``.
"""

from __future__ import annotations


class TaskInputError(ValueError):
    """Input a hospital or the coordinator supplied is unusable; raised before training."""

    def __init__(self, message: str = "", key: str = "",
                 counts: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.counts = dict(counts or {})


class ModelNotFoundError(TaskInputError):
    """The configured model id or path cannot be loaded offline."""


class HospitalDataError(TaskInputError):
    """A hospital's data is empty or disagrees with the global label set."""


class UnknownLabelsError(HospitalDataError):
    """Records carry labels outside the global label set (``counts["records"]``: how many)."""


class DataFileError(TaskInputError):
    """A data file is missing, unreadable, not UTF-8, or lacks a configured column."""
