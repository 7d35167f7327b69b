"""The MLflow name of a run whose ``tracking.run_name`` is not given: what it trains with.

    fedavg-dp_sgd-eps8-r4                         strategy, privacy, rounds
    fedadam-distributed_dp-eps8-secagg_plus-r60   secure aggregation when it is on
    fedavg-nodp-r4                                no differential privacy

The same settings always give the same name. A sweep's job adds what its sweep varies beyond
these (``fedavg-nodp-r4-learning_rate-0.01``); the sweep's parent run lists those keys.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only named: importing it registers the schema in Hydra's ConfigStore
    from clinical_fl.settings.run import RunSettings

# Keys a sweep may vary that the name above already shows.
SHOWN = ("strategy", "strategy.name", "privacy", "privacy.mechanism",
         "privacy.dp_sgd.target_epsilon", "privacy.dp_sgd.noise_multiplier",
         "privacy.distributed_dp.target_epsilon",
         "privacy.distributed_dp.noise_multiplier", "privacy.central_dp.enabled",
         "privacy.central_dp.noise_multiplier", "secure_aggregation", "secure_aggregation.mode",
         "num_rounds")


def _number(value: float) -> str:
    """8.0 -> 8, 0.5 -> 0.5, 1e-05 -> 1e-05, inf -> inf."""
    return "inf" if math.isinf(value) else f"{value:g}"


def privacy_parts(settings: RunSettings) -> list[str]:
    """Each mechanism that is on, with its target epsilon or its fixed noise."""
    privacy, parts = settings.privacy, []
    section, name = privacy.section(privacy.mechanism), privacy.mechanism.value
    if section is not None:
        parts.append(f"{name}-eps{_number(section.target_epsilon)}"
                     if section.noise_multiplier is None
                     else f"{name}-noise{_number(section.noise_multiplier)}")
    if privacy.central_dp.enabled:
        parts.append(f"central_dp-noise{_number(privacy.central_dp.noise_multiplier)}")
    return parts or ["nodp"]


def default_run_name(settings: RunSettings) -> str:
    parts = [settings.strategy.name.value, *privacy_parts(settings)]
    if settings.secure_aggregation.enabled:
        parts.append(settings.secure_aggregation.mode.value)
    parts.append(f"r{settings.num_rounds}")
    return "-".join(parts)


def _short(key: str) -> str:
    """``train.learning_rate`` -> ``learning_rate``; ``model.lora.r`` -> ``lora.r``."""
    parts = key.lstrip("+~").split(".")
    return ".".join(parts[-2:]) if len(parts[-1]) <= 2 and len(parts) > 1 else parts[-1]


def sweep_job_name(settings: RunSettings, overrides: list[str], varied: list[str]) -> str:
    """The default name and, for each key the sweep varies that the name does not show, its
    value in this job (from the job's overrides): plain characters only."""
    given = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep:
            given[key.lstrip("+~")] = value
    extra = [f"{_short(key)}-{given[key]}" for key in varied
             if key not in SHOWN and key in given]
    name = "-".join([default_run_name(settings), *extra])
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)
