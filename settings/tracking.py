"""Typed settings of run tracking: where MLflow keeps the run, and what is logged."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrackingSettings:
    # None: SQLite store and artifacts under mlruns/ at the project root.
    uri: str | None = None
    experiment: str = "clinical-fl"
    run_name: str | None = None
    log_per_hospital: bool = True
    save_adapter: bool = True
    # Set by a sweep (clinical-fl -m): the MLflow parent run and the sweep's name.
    parent_run_id: str | None = None
    sweep: str | None = None
