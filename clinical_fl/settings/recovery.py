"""Typed settings of surviving faults: the server's checkpoints, the checks every update
passes before aggregation, and the fault drill that rehearses both (simulation only)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from clinical_fl.settings.checks import ConfigError, require


@dataclass
class CheckpointSettings:
    """After every completed round the server writes its state (global adapter, strategy
    state, round, budget gate, MLflow run id) to ``<dir>/<MLflow run id>/``; ``resume=<run
    id>`` continues from it."""

    # None: beside the MLflow store (server-state/ next to mlflow.db; with a tracking server,
    # mlruns/server-state/ at the project root).
    dir: str | None = None
    # Also log the latest checkpoint as the MLflow artifact checkpoint/checkpoint.npz: a
    # server whose disk is lost resumes from the tracking server's copy.
    log_artifact: bool = True


@dataclass
class UpdateCheckSettings:
    """Every train reply is checked against the global adapter before aggregation: the same
    keys, shapes, float32, finite values, and an update (reply - global) of L2 norm at most
    ``max_update_norm``. A reply that fails is left out of the round."""

    # None: no bound. The default is far above what training moves the adapter in a round
    # (docs/benchmarks.md, "Faults"), and far below what a numeric blow-up sends.
    max_update_norm: float | None = 1000.0
    # A hospital whose replies fail this many times is sent no more work.
    drop_after: int = 3

    def __post_init__(self) -> None:
        require(self.max_update_norm is None or self.max_update_norm > 0,
                "update_checks.max_update_norm", self.max_update_norm,
                "greater than 0, or null (no bound)")
        require(self.drop_after >= 1, "update_checks.drop_after", self.drop_after,
                "at least 1")


class Fault(Enum):
    """What a drilled hospital does to its train reply."""

    nan = "nan"  # one value NaN
    inf = "inf"  # one value +Inf
    missing_key = "missing_key"  # one array left out
    wrong_shape = "wrong_shape"  # one array one row short
    float64 = "float64"  # every array float64
    huge = "huge"  # every value x 1e6 (finite: only the norm bound catches it)
    stall = "stall"  # waits STALL_SECONDS before training (a hospital slower than the others)
    crash = "crash"  # trains, then raises: no update, an error reply (a hospital lost mid-round)
    # Trains, then its process dies (os._exit). A deployed hospital's node config only: Flower's
    # simulation engine does not survive a Ray worker exiting (measured: every later message
    # of the run failed), so drill.faults refuses it.
    exit = "exit"


STALL_SECONDS = 60.0
FAULT_SPEC = re.compile(r"^(\d+):([a-z_0-9]+)(?:@(\d+))?$")


@dataclass(frozen=True)
class InjectedFault:
    hospital: int
    fault: Fault
    round: int | None  # None: every round

    def applies(self, hospital: int, server_round: int) -> bool:
        return hospital == self.hospital and self.round in (None, server_round)


def parse_fault(spec: str, deployed: bool = False) -> InjectedFault:
    """``"<hospital>:<fault>[@<round>]"``; ``exit`` only for a deployed hospital."""
    match = FAULT_SPEC.match(spec.strip())
    kinds = [f.value for f in Fault if deployed or f != Fault.exit]
    if not match or match.group(2) not in kinds:
        raise ConfigError(f"invalid configuration at 'drill.faults': got {spec!r}, expected "
                          f"'<hospital>:<fault>' or '<hospital>:<fault>@<round>' with a fault "
                          f"in {kinds}")
    hospital, kind, at = match.groups()
    return InjectedFault(int(hospital), Fault(kind), int(at) if at else None)


@dataclass
class DrillSettings:
    """Faults injected into chosen hospitals' train replies, to rehearse the server's
    defences (update checks, dropping a hospital, a crashed hospital). Simulation only: a
    deployed hospital (reading its own data-path) refuses a drill the server asks for."""

    faults: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for spec in self.faults:
            parse_fault(spec)

    def fault_for(self, hospital: int, server_round: int) -> Fault | None:
        for spec in self.faults:
            fault = parse_fault(spec)
            if fault.applies(hospital, server_round):
                return fault.fault
        return None
