"""Mods around the ClientApp's handlers."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from protocol.messages import CLIPPING_NORM_KEY


def asks_for_clipping(msg: Message) -> bool:
    return any(CLIPPING_NORM_KEY in config for config in msg.content.config_records.values())


def clip_update_for_client_level_dp(msg: Message, context: Context,
                                    call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` when the server runs client-level DP, else a no-op.

    Flower's mod fails every message without a clipping norm, so it cannot be
    registered unconditionally: one app serves runs with and without server-side DP.
    """
    if asks_for_clipping(msg):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
