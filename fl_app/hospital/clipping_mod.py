"""Mods around the ClientApp's handlers."""

from __future__ import annotations

import math

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from clinical_fl.protocol.messages import CLIPPING_NORM_KEY, CONFIG_RECORD, TASK_KEY
from clinical_fl.settings.privacy import RecordLevelMechanism
from tasks.errors import TaskInputError


class ClippingRefused(TaskInputError):
    """A client-level clipping norm this hospital will not apply."""


def asks_for_clipping(msg: Message) -> bool:
    return any(CLIPPING_NORM_KEY in config for config in msg.content.config_records.values())


def _check_clipping_norm(msg: Message) -> None:
    norms = [config[CLIPPING_NORM_KEY] for config in msg.content.config_records.values()
             if CLIPPING_NORM_KEY in config]
    norm = norms[0]
    if isinstance(norm, bool) or not isinstance(norm, int | float) \
            or not math.isfinite(norm) or norm <= 0:
        raise ClippingRefused(f"client-level DP's clipping norm {norm!r} is not a finite number "
                              "> 0")


def clip_update_for_client_level_dp(msg: Message, context: Context,
                                    call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the server runs client-level DP, else a no-op.

    Flower's mod fails every message without a clipping norm, so it cannot be
    registered unconditionally: one app serves runs with and without server-side DP.
    Distributed DP's noisy share is never clipped by it: scaling the share would scale its
    noise with it (a norm of 0 leaves none), while the ledger books the planned noise.
    """
    if not asks_for_clipping(msg):
        return call_next(msg, context)
    _check_clipping_norm(msg)
    if _distributed(msg):
        raise ClippingRefused("client-level clipping of a distributed DP share: refused",
                              key="privacy.distributed_dp")
    return fixedclipping_mod(msg, context, call_next)


def _distributed(msg: Message) -> bool:
    """Whether the message's task settings choose distributed DP, parsed as the handler
    parses them (``privacy.mechanism`` in any spelling the schema takes)."""
    from clinical_fl.settings.compose import task_settings_from_yaml

    config = msg.content.config_records.get(CONFIG_RECORD)
    if config is None or TASK_KEY not in config:
        return False  # no settings: the handler refuses the message itself
    try:
        privacy = task_settings_from_yaml(str(config[TASK_KEY])).privacy
    except Exception:  # unreadable or invalid: the handler refuses them; assume the strict case
        return True
    return privacy.mechanism == RecordLevelMechanism.distributed_dp
