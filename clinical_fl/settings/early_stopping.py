"""Typed settings of early stopping: ``num_rounds`` as a ceiling for non-private runs.

After every evaluated round the server reads the federated validation score (by default
``federated/macro_f1``: what the hospitals report on their own held-out notes). When it has
not improved by more than ``min_delta`` for ``patience`` evaluated rounds in a row, the run
ends after that round, and the best round's global adapter, not the last one's, is the run's
model (the ``adapter/`` artifact and the MLflow Model). fl_app/server/early_stopping.py does it.

Never in a private run: DP-SGD's, distributed DP's and client-level DP's noise is calibrated
for the planned rounds, so a private run always trains them all and keeps its last adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from clinical_fl.settings.bounds import (
    require_count,
    require_defaults_while_off,
    require_non_negative,
)
from clinical_fl.settings.checks import require

# Scores early stopping may follow: the federated evaluation's, higher is better. The
# server's own test notes (central/*) are left out on purpose: they report the model, and
# choosing the round by them would make that report optimistic.
MAXIMISED_METRICS = ("federated/macro_f1", "federated/accuracy")
MAX_PATIENCE = 10_000


@dataclass
class EarlyStoppingSettings:
    """Stop a non-private run when the federated validation score stops improving, and keep
    the best round's adapter.

    ``enabled``: null (the default) means on for a non-private run and off for a private one
    (``privacy.dp_sgd``, ``privacy.distributed_dp`` or ``privacy.central_dp`` on), and off for
    a privacy sweep's non-private level (``target_epsilon=inf``), whose rounds must match the
    private levels it is compared with. ``true`` in a private run is refused, naming the key:
    the noise of every private mechanism here is calibrated for the planned rounds. Building
    the run's settings resolves null to true or false (clinical_fl/settings/run.py), so what
    MLflow logs is what the run does.

    Why on by default: ``num_rounds`` is the budget a user is willing to spend, and a
    federated run that has stopped improving spends every further round of every hospital
    for nothing; the model shipped should be the one that scored best on the hospitals'
    held-out notes, not whichever came last. With the defaults (patience 2, min_delta 0) the
    default 4-round run stops only if rounds 2 and 3 both fail to beat round 1, which a
    learning run does not do; tools that select models by validation (scikit-learn's
    ``HistGradientBoosting``'s ``early_stopping='auto'``) switch it on by default the same
    way, depending on the run. ``early_stopping.enabled=false`` trains every round and keeps
    the last round's adapter, as before.
    """

    SECTION: ClassVar[str] = "early_stopping"
    TURN_ON: ClassVar[str] = "early_stopping.enabled=true (or null, its default, in a "\
        "non-private run)"

    enabled: bool | None = None
    # Evaluated rounds in a row without improvement before the run stops. Rounds that are not
    # evaluated (evaluate_every > 1) do not count; round 0 (the untrained adapter) is never a
    # candidate and never counts.
    patience: int = 2
    # An improvement is a score above the best so far by more than this.
    min_delta: float = 0.0
    # One of MAXIMISED_METRICS.
    metric: str = "federated/macro_f1"

    def __post_init__(self) -> None:
        key = self.SECTION
        if self.enabled is False:  # switched off: every other value must be its default
            require_defaults_while_off(self, key, "enabled", self.TURN_ON)
        require_count(self.patience, f"{key}.patience", 1, MAX_PATIENCE)
        require_non_negative(self.min_delta, f"{key}.min_delta")
        require(self.metric in MAXIMISED_METRICS, f"{key}.metric", self.metric,
                f"one of {list(MAXIMISED_METRICS)} (the hospitals' held-out notes; "
                "central/* is the server's test set, which reports the model and is not "
                "used to choose it)")
