"""The server's checkpoint: everything a federated run needs to go on after a crash.

One file per run, ``<state dir>/<MLflow run id>/checkpoint.npz``, replaced after every
completed round: written to a temporary file in the same directory, synced, renamed over
the old one and the directory synced, so a crash at any moment leaves either the previous
round's checkpoint or this one, never a torn file. A NumPy archive (a zip of ``.npy``
arrays, each with its CRC) read with ``allow_pickle=False``: loading a checkpoint runs no
code from it. The arrays are the global adapter, the strategy's own arrays (server
optimiser moments, momentum) and, under early stopping, the best round's adapter when it is
not this round's; the rest is one JSON document. Checkpoints written before early stopping
existed read with its state empty.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT = 1
_META = "meta"
_GLOBAL = "global/"
_STRATEGY = "strategy/"
_BEST = "best/"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not this run's."""


@dataclass
class ServerCheckpoint:
    mlflow_run_id: str
    round: int  # the last completed round (0: only the untrained adapter was evaluated)
    num_rounds: int  # the rounds the run was configured for when it wrote this
    ledger_run: int  # the Flower run whose privacy-ledger entries the hospitals continue
    overrides: list[str]  # the Hydra overrides the run was composed from (without resume=)
    config: dict  # the resolved configuration, to refuse a resume that changes it
    task_yaml: str  # the settings every message carried (planned rounds, DP plans)
    arrays: dict[str, np.ndarray]  # the global adapter after ``round``
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    strategy_state: dict = field(default_factory=dict)  # JSON-able state (accountants)
    excluded: dict[int, str] = field(default_factory=dict)  # hospital -> why no more work
    rejections: dict[int, int] = field(default_factory=dict)  # hospital -> rejected updates
    metrics: dict[str, float] = field(default_factory=dict)  # this round's logged metrics
    history: dict[int, dict[str, float]] = field(default_factory=dict)  # for the plot
    # Early stopping (fl_app/server/early_stopping.py): metric, best_round, best_value, stale; empty
    # when it is off. best_arrays: the best round's adapter, empty when it is ``arrays``.
    early_stopping: dict = field(default_factory=dict)
    best_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def meta(self) -> dict:
        meta = asdict(self)
        del meta["arrays"], meta["strategy_arrays"], meta["best_arrays"]
        meta["format"] = FORMAT
        return meta


def save_checkpoint(checkpoint: ServerCheckpoint, directory: Path) -> Path:
    """Write atomically to ``directory/checkpoint.npz``; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = {_META: np.array(json.dumps(checkpoint.meta()))}
    entries.update({_GLOBAL + k: np.ascontiguousarray(v) for k, v in checkpoint.arrays.items()})
    entries.update({_STRATEGY + k: np.ascontiguousarray(v)
                    for k, v in checkpoint.strategy_arrays.items()})
    entries.update({_BEST + k: np.ascontiguousarray(v) for k, v in checkpoint.best_arrays.items()})
    target = directory / CHECKPOINT_FILE
    handle, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **entries)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
    return target


def load_checkpoint(path: Path) -> ServerCheckpoint:
    """Read a checkpoint; a missing, torn or foreign file is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            entries = {name: archive[name] for name in archive.files}
        meta = json.loads(str(entries.pop(_META)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable (corrupted or truncated): "
                              f"{type(err).__name__}: {err}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; this "
                              f"version reads format {FORMAT}")
    meta.pop("format")
    arrays = {k.removeprefix(_GLOBAL): v for k, v in entries.items() if k.startswith(_GLOBAL)}
    strategy_arrays = {k.removeprefix(_STRATEGY): v for k, v in entries.items()
                       if k.startswith(_STRATEGY)}
    best_arrays = {k.removeprefix(_BEST): v for k, v in entries.items() if k.startswith(_BEST)}
    if not arrays:
        raise CheckpointError(f"checkpoint {path} holds no global adapter arrays")
    try:
        checkpoint = ServerCheckpoint(arrays=arrays, strategy_arrays=strategy_arrays,
                                      best_arrays=best_arrays, **meta)
    except TypeError as err:
        raise CheckpointError(f"checkpoint {path} does not hold a server checkpoint: {err}") \
            from err
    # JSON turned integer keys into strings.
    checkpoint.excluded = {int(k): v for k, v in checkpoint.excluded.items()}
    checkpoint.rejections = {int(k): v for k, v in checkpoint.rejections.items()}
    checkpoint.history = {int(k): v for k, v in checkpoint.history.items()}
    return checkpoint
