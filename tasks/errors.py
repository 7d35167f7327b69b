"""Errors for bad input. Each message names the culprit and what was expected."""


class TaskInputError(ValueError):
    """Input a hospital or the coordinator supplied is unusable; raised before training."""


class ModelNotFoundError(TaskInputError):
    """The configured model id or path cannot be loaded offline."""


class HospitalDataError(TaskInputError):
    """A hospital's data is empty or disagrees with the global label set."""


class DataFileError(TaskInputError):
    """A data file is missing, unreadable, not UTF-8, or lacks a configured column."""
