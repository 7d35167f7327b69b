"""What the server can check of ``data.*`` before any hospital is asked: the path, the columns,
the labels and the server's test split. Called by ``clinical-fl`` (and
``python -m fl_app.commands.run_config_check``) before ``flwr run`` starts anything, and by the
ServerApp before its first message.

The server reads the hospitals' data only where it needs it: to find the global label set
(``data.labels`` empty) and for its own test notes (``data.split_column`` given). In a
deployment each hospital reads its own ``data-path`` and the server may not see the files, so
with ``data.labels`` given and no test split it reads nothing; the hospitals' preflight checks
their own files then. Where the hospitals read ``data.path`` on this machine (a local
simulation: ``hospitals_read_here``) everything is checked: the path, every column and every
label against ``data.labels``.

A problem is a ``ConfigError`` naming the setting (``data.path``, ``data.label_column``,
``data.labels``, ...) with the file, row or column the loader found.
"""

from __future__ import annotations

import os
from pathlib import Path

from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.data import DataSettings, DataSource
from tasks.errors import TaskInputError


def _on_this_machine(data: DataSettings) -> bool:
    """Whether ``data.path`` names something the server can look at without a network: files,
    globs and folders do; a Hugging Face hub id (no such local path) does not."""
    if data.source != DataSource.huggingface:
        return True
    path = os.path.expanduser(data.path or "")
    return Path(path).exists() or path.startswith((os.sep, ".", "~"))


def server_labels(data: DataSettings) -> list[str]:
    """The ServerApp's global label set, once what the server reads of the data holds."""
    return checked_labels(data, hospitals_read_here=False)


def check_data(data: DataSettings, hospitals_read_here: bool) -> None:
    """Before ``flwr run``: everything the server can check of the data (and, where the
    hospitals read ``data.path`` on this machine, what they will read). A Hugging Face hub id
    is left to the ServerApp: this would download it."""
    if _on_this_machine(data):
        checked_labels(data, hospitals_read_here)


def checked_labels(data: DataSettings, hospitals_read_here: bool) -> list[str]:
    """The global label set (``source_labels``), once the checks above hold."""
    # Imported here: the loaders bring datasets and the de-identifier (seconds), which the
    # command lines need only when they get this far.
    from tasks.data.hospital_data import source_labels
    from tasks.data.loaders import load_records

    server_reads = data.source != DataSource.synthetic and bool(data.path) and (
        not data.labels or bool(data.split_column) or hospitals_read_here)
    try:
        if not server_reads:
            return source_labels(data)
        records = load_records(data)
        labels = list(data.labels) if data.labels else sorted(set(records.label))
        if len(labels) < 2:
            raise ConfigError(
                f"invalid data at 'data.label_column': {data.path} holds {len(labels)} "
                f"label(s) {labels} in column '{data.label_column}'; a classifier needs at "
                "least 2", key="data.label_column")
        records.check_labels(labels, data.label_column)
        if data.split_column and not records.where_split(data.test_split, keep=True).text:
            raise ConfigError(
                f"invalid data at 'data.test_split': {data.path} has no rows with "
                f"{data.split_column} = '{data.test_split}' for the server's test set",
                key="data.test_split")
        return labels
    except TaskInputError as err:
        key = err.key or "data.path"
        raise ConfigError(f"invalid data at '{key}': {err}", key=key) from err
