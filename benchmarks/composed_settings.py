"""Settings for benchmarks that run hospitals in one process, made as the product makes them:
Hydra's compose of ``conf/`` with overrides (``clinical_fl/settings/compose.py``), every dataclass
checking itself, then what the ServerApp sends each hospital (``task_settings`` with the
rounds each hospital is planned to train in, which DP-SGD calibrates its noise for)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from clinical_fl.settings.compose import RunSettings, compose_config, task_settings, to_run_settings
from clinical_fl.settings.task import TaskSettings
from fl_app.server.server_app import planned_rounds_per_hospital
from tasks.data.hospital_data import source_labels


@dataclass
class Composed:
    run: RunSettings
    task: TaskSettings  # what each hospital receives
    labels: list[str]


def compose(overrides: list[str], hospitals: int) -> Composed:
    """The run's settings for ``hospitals`` simulated hospitals (Hydra override syntax)."""
    cfg = compose_config(overrides)
    run = to_run_settings(cfg)
    labels = source_labels(run.data)
    planned = planned_rounds_per_hospital(run.num_rounds, hospitals,
                                          run.strategy.fraction_train, run.strategy.min_hospitals)
    task = replace(task_settings(cfg, labels), planned_rounds=planned)  # checked again
    return Composed(run=run, task=task, labels=labels)
