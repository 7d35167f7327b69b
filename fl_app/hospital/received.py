"""What a hospital accepts from the server's messages, checked before any step.

The task settings arrive as YAML in every message. They are parsed with the same typed
schema the server composes them with (every privacy parameter checked: finite, in range),
the hospital's own data mapping is put in place (``tasks/data/mapping.py``), and a
distributed-DP plan is held against the round it came with. What fails is raised as an
error that the hospital's edge (``fl_app/hospital/edge.py``) turns into a refusal code.
"""

from __future__ import annotations

from dataclasses import replace

import yaml
from flwr.app import ConfigRecord, Message

from clinical_fl.protocol import messages as m
from clinical_fl.settings.bounds import is_finite
from clinical_fl.settings.compose import task_settings_from_yaml
from clinical_fl.settings.privacy import RecordLevelMechanism
from clinical_fl.settings.task import TaskSettings
from clinical_fl.settings.train import LearningRateSchedule
from tasks.data.mapping import hospital_data_settings
from tasks.errors import TaskInputError
from tasks.privacy.policy import HospitalPolicy

# Far above any real task (a few KiB), far below what would hurt to parse.
MAX_TASK_BYTES = 256 * 1024
# FedProx's mu is 0.001-1 in practice; far above that the term swamps the loss (and at
# 1e308 it turns the weights into NaN).
MAX_PROXIMAL_MU = 1e4


class SettingsUnreadable(TaskInputError):
    """The task settings are missing, not text, not YAML, or too large."""


class PrivacyPlanError(TaskInputError):
    """A privacy parameter does not fit the round it came with."""


class RoundSettingError(TaskInputError):
    """A value the server sent with one round (not in the task settings) is unusable."""


def task_yaml(msg: Message) -> str:
    """The task settings' YAML text of a message, within the size bound."""
    try:
        text = msg.content[m.CONFIG_RECORD][m.TASK_KEY]
    except (KeyError, TypeError) as err:
        raise SettingsUnreadable("the message carries no task settings") from err
    if not isinstance(text, str):
        raise SettingsUnreadable(f"the task settings are a {type(text).__name__}, not text")
    if len(text.encode("utf-8", errors="replace")) > MAX_TASK_BYTES:
        raise SettingsUnreadable(f"the task settings are {len(text)} characters, more than "
                                 f"{MAX_TASK_BYTES} bytes")
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SettingsUnreadable(f"the task settings are not YAML: {err}") from err
    if not isinstance(tree, dict):
        raise SettingsUnreadable("the task settings are not a mapping of sections")
    return text


def received_settings(msg: Message, policy: HospitalPolicy) -> TaskSettings:
    """The server's task settings, validated, with the hospital's data mapping in place."""
    settings = task_settings_from_yaml(task_yaml(msg))
    return replace(settings, data=hospital_data_settings(settings.data, policy))


def check_distributed_round(settings: TaskSettings, config: ConfigRecord) -> None:
    """Distributed DP's noise share is sigma/sqrt(t): it protects only if every released sum
    holds at least t hospitals' shares. The round's threshold and size come from this
    hospital's secure-aggregation mod (set only for a message that came through the
    protocol); a plan whose t the round does not enforce, or cannot reach, is refused."""
    planned = settings.privacy.distributed_dp.threshold
    key = "privacy.distributed_dp.threshold"
    enforced = config.get(m.SECURE_AGGREGATION_THRESHOLD)
    hospitals = config.get(m.SECURE_AGGREGATION_HOSPITALS)
    if planned is None or enforced is None or hospitals is None:
        raise PrivacyPlanError("the distributed DP plan or the round's secure-aggregation "
                               "threshold is missing", key=key)
    counts = {"threshold": int(enforced), "hospitals": int(hospitals)}
    if int(planned) > int(hospitals):
        raise PrivacyPlanError(f"the plan's threshold t={planned} is larger than the round's "
                               f"{hospitals} hospitals: its noise share sigma/sqrt(t) would "
                               "sum to less than sigma", key=key, counts=counts)
    if int(enforced) < int(planned):
        raise PrivacyPlanError(f"the round releases sums of {enforced} hospitals, fewer than "
                               f"the t={planned} the noise share assumes", key=key,
                               counts=counts)


def received_lr_factor(settings: TaskSettings, config: ConfigRecord) -> float:
    """This round's factor of the learning rates: sent only under ``train.lr_schedule=cosine``
    and then a number in [final fraction, 1]; a factor under a constant schedule, or none
    under cosine, is refused (the server and the settings it sent disagree)."""
    key = "train.lr_schedule"
    sent = config.get(m.LR_FACTOR_KEY)
    if settings.train.lr_schedule == LearningRateSchedule.constant:
        if sent is not None:
            raise RoundSettingError("a learning-rate factor came with a constant schedule",
                                    key=key)
        return 1.0
    if sent is None:
        raise RoundSettingError("the round's learning-rate factor is missing", key=key)
    lowest = settings.train.lowest_lr_factor()
    if not _number_within(sent, lowest, 1.0):
        raise RoundSettingError(f"the learning-rate factor is outside [{lowest}, 1]", key=key)
    return float(sent)


def received_proximal_mu(settings: TaskSettings, config: ConfigRecord) -> float:
    """FedProx's proximal term: a number in [0, MAX_PROXIMAL_MU] (0 when not sent), and 0
    under distributed DP, whose round takes no local steps that the term could act on."""
    mu = config.get(m.PROXIMAL_MU_KEY, 0.0)
    if not _number_within(mu, 0.0, MAX_PROXIMAL_MU):
        raise RoundSettingError(f"the proximal term is not a number in [0, {MAX_PROXIMAL_MU}]",
                                key=m.PROXIMAL_MU_KEY)
    if mu > 0 and settings.privacy.mechanism == RecordLevelMechanism.distributed_dp:
        raise RoundSettingError("a proximal term came with distributed DP, which takes no "
                                "local steps", key=m.PROXIMAL_MU_KEY)
    return float(mu)


def _number_within(value: object, low: float, high: float) -> bool:
    """A finite real number (not a bool) in [low, high]; an int too large for a float is not."""
    try:
        return is_finite(value) and low <= float(value) <= high
    except OverflowError:
        return False
