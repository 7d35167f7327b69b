"""The hospital's own data mapping, applied to the data settings the server sent.

Which file holds the notes, which columns hold text, label, site and split, how many
records are held out for evaluation, and whether de-identification may be switched off are
the hospital's to decide (its node config, or its policy file: ``tasks/privacy/policy.py``).
A server that could choose them could point the label column at the notes and read them back
through error messages, or hold out 99% of the records and score them without noise.

A server value equal to the schema's default counts as not set (the hospital's holds); any
other value that differs from the hospital's is refused, naming the key, never replaced in
silence: the server's operator learns that the two disagree.
"""

from __future__ import annotations

from dataclasses import fields, replace

from clinical_fl.settings.data import DataSettings, DataSource, DeidSettings
from tasks.errors import TaskInputError
from tasks.privacy.plan import PolicyRefusal
from tasks.privacy.policy import MAPPING_KEYS, HospitalPolicy

_DEFAULTS = {f.name: f.default for f in fields(DataSettings)
             if isinstance(f.default, str | int | float | None)}
_DEID_DEFAULTS = DeidSettings()


def _owned(policy: HospitalPolicy) -> list[str]:
    """The data settings that are the hospital's: how many records it holds out always;
    which file and columns when it reads its own export (a simulated hospital taking a
    partition of the server's corpus reads it with the server's columns, unless its policy
    names them)."""
    if policy.data_path:
        # The seed too: it draws which of its records are held out and scored without noise.
        return [*MAPPING_KEYS.values(), "seed"]
    return sorted({"eval_fraction", *policy.data_mapping})


def _check_deid(server: DataSettings, policy: HospitalPolicy) -> None:
    """Required de-identification cannot be weakened either: a higher confidence threshold
    than the default drops findings (at 1.0, all of them), and a spaCy model path is the
    server's probe of the hospital's file system."""
    deid = server.deid
    if deid.score_threshold > _DEID_DEFAULTS.score_threshold:
        raise PolicyRefusal(
            f"hospital {policy.hospital}: data.deid.score_threshold={deid.score_threshold} is "
            f"above the default {_DEID_DEFAULTS.score_threshold}; the hospital's policy "
            "requires de-identification, which it would weaken",
            key="data.deid.score_threshold")
    if deid.spacy_model is not None:
        raise PolicyRefusal(
            f"hospital {policy.hospital}: data.deid.spacy_model={deid.spacy_model!r}: the "
            "server does not choose the hospital's de-identification model",
            key="data.deid.spacy_model")


class DataMappingRefused(TaskInputError):
    """A data setting from the server differs from the hospital's own mapping."""


def hospital_data_settings(server: DataSettings, policy: HospitalPolicy) -> DataSettings:
    """The data settings this hospital reads its records with: the server's, with the
    hospital's mapping in place; raises when the server set a value that differs."""
    if not policy.owns_data:
        return server  # a simulated hospital without a policy file: the server's mapping
    if not policy.data_path and server.source != DataSource.synthetic:
        # Reading a file the server names: which files and columns exist, and how many
        # rows hold a value, would be the server's to probe.
        raise DataMappingRefused(
            f"hospital {policy.hospital}: the server names the data (data.source="
            f"{server.source.value}, data.path={server.path!r}); this hospital reads only its "
            "own data-path (node config or policy file), and has none", key="data.path")
    mapped = {}
    for setting in _owned(policy):
        mine = policy.data_mapping.get(setting, _DEFAULTS[setting])
        theirs = getattr(server, setting)
        if theirs != mine and theirs != _DEFAULTS.get(setting):
            raise DataMappingRefused(
                f"hospital {policy.hospital}: the server sent data.{setting}={theirs!r}, the "
                f"hospital's mapping ({policy.source}) says {mine!r}; refused",
                key=f"data.{setting}")
        mapped[setting] = mine
    if policy.deid_required:
        _check_deid(server, policy)
    if policy.deid_required and not server.deid.enabled:
        raise PolicyRefusal(
            f"hospital {policy.hospital}: the server asked for data.deid.enabled=false; the "
            f"hospital's policy ({policy.source}) requires de-identification (deid = "
            "\"allowed\" in its policy would permit it)", key="data.deid.enabled")
    # Built again so that the dataclass checks the mapped values as it checks the server's.
    return replace(server, **mapped)
