"""Where a hospital's SecAgg+ signing key and roster come from.

Deployed (``data-path`` or ``state-dir`` in the node config): the node config names both,
``secagg-signing-key`` (``deploy/supernode.sh`` sets it to the SuperNode authentication key)
and ``secagg-roster`` (``deploy/roster.sh``: the federation's hospitals' public keys, checked
out of band). A deployed hospital without them refuses SecAgg+ before any key is made: a
roster the server could send would prove nothing.

Simulation: every hospital runs on one machine, so each keeps a key in its state directory
under ``$FLWR_HOME`` and the roster is the public keys of those directories.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context

from clinical_fl.secure_aggregation import signing
from clinical_fl.secure_aggregation.ckks import KeyMaterialError
from fl_app.hospital.node_config import hospital_name, is_deployed, state_dir

SIGNING_KEY = "secagg-signing-key"
ROSTER = "secagg-roster"
SIMULATION_KEY_FILE = "secagg-signing-key.pem"


class SigningKeyMissing(KeyMaterialError):
    """A deployed hospital without a signing key or roster, or one it cannot use."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def signing_key(context: Context) -> signing.PrivateKey:
    """The hospital's long-term signing key."""
    configured = context.node_config.get(SIGNING_KEY)
    if configured:
        return _loaded(lambda: signing.load_private_key(Path(str(configured)).expanduser(),
                                                        hospital_name(context)), SIGNING_KEY)
    if is_deployed(context):
        raise SigningKeyMissing(
            f"{hospital_name(context)}: secure_aggregation=secagg_plus, but the node config "
            f"names no {SIGNING_KEY}; start the SuperNode with deploy/supernode.sh --key "
            "(its authentication key signs the round keys)", SIGNING_KEY)
    path = state_dir(context) / SIMULATION_KEY_FILE
    if path.exists():
        return _loaded(lambda: signing.load_private_key(path, hospital_name(context)),
                       SIGNING_KEY)
    try:
        return signing.new_private_key(path)
    except FileExistsError:  # made by another process of the same hospital meanwhile
        return _loaded(lambda: signing.load_private_key(path, hospital_name(context)),
                       SIGNING_KEY)


def roster(context: Context) -> signing.Roster:
    """The public keys of the hospitals this one trusts to sign round keys and views."""
    configured = context.node_config.get(ROSTER)
    if configured:
        return _loaded(lambda: signing.load_roster(Path(str(configured)).expanduser(),
                                                   hospital_name(context)), ROSTER)
    if is_deployed(context):
        raise SigningKeyMissing(
            f"{hospital_name(context)}: secure_aggregation=secagg_plus, but the node config "
            f"names no {ROSTER}; make it with `bash deploy/roster.sh` from the hospitals' "
            "public keys and start the SuperNode with deploy/supernode.sh --roster FILE",
            ROSTER)
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    lines = [p.read_bytes() for p in sorted(
        (home / "clinical-fl" / "hospital-state").glob(f"*/{SIMULATION_KEY_FILE}.pub"))]
    return signing.parse_roster(lines, "simulation roster")


def _loaded(load, key: str):  # noqa: ANN001, ANN202 - a loader and what it returns
    try:
        return load()
    except signing.SigningKeyError as err:
        raise SigningKeyMissing(str(err), key) from err
