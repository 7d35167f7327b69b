"""Record-level privacy as one interface, chosen by name (``privacy.mechanism``).

A hospital asks ``record_level_privacy(settings.privacy)`` for its mechanism and runs its
round through it (``base.py::RecordLevelPrivacy``); it never branches on which one it got.
Each mechanism is one module here that owns its plan, its step and its accounting calls:

- ``no_dp.py``: ``none``, plain local training (refused where the hospital's policy
  requires DP);
- ``dp_sgd.py``: ``dp_sgd``, DP-SGD inside the hospital (the optimizer loop is
  ``tasks/privacy/dp_sgd.py``);
- ``distributed_dp.py``: ``distributed_dp``, the hospital's share of one DP-SGD step over all
  hospitals, summed under secure aggregation (``tasks/privacy/distributed_dp.py``).

Client-level DP is not here: it is a server strategy wrapper (``strategies/central_dp.py``).
A new mechanism is its module here (and its line below), its preset in ``conf/privacy/`` and
its section in ``clinical_fl/settings/privacy.py`` (its value of ``RecordLevelMechanism``).
"""

from __future__ import annotations

from clinical_fl.settings.privacy import PrivacySettings, RecordLevelMechanism
from tasks.privacy.mechanisms.base import RecordLevelPrivacy, RoundInputs
from tasks.privacy.mechanisms.distributed_dp import DistributedDp
from tasks.privacy.mechanisms.dp_sgd import DpSgd
from tasks.privacy.mechanisms.no_dp import NoRecordLevelDp

MECHANISMS: dict[RecordLevelMechanism, type[RecordLevelPrivacy]] = {
    mechanism.name: mechanism for mechanism in (NoRecordLevelDp, DpSgd, DistributedDp)}

__all__ = ["MECHANISMS", "RecordLevelPrivacy", "RoundInputs", "record_level_privacy"]


def record_level_privacy(privacy: PrivacySettings) -> RecordLevelPrivacy:
    """The mechanism ``privacy.mechanism`` names, with its settings."""
    return MECHANISMS[privacy.mechanism](privacy)
