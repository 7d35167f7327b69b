"""A Grid that says, while a round waits on hospitals, who it is still waiting for.

On long notes a round is many minutes of local training; Flower's Grid waits in silence.
This one sends and collects the same way (push, then pull until every reply is in or the
timeout passes) and, every ``every_s`` seconds of waiting, logs one line: the round, what
it waits for, how many hospitals have answered and which have not. It polls every quarter
second instead of Flower's three (a pull is one small request to the SuperLink), and sooner at
first (0.02 s, doubling), so that short exchanges (secure aggregation's key stages, a few
milliseconds at each hospital) do not wait seconds for their replies, nor a round up to a
second after its last one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message

from clinical_fl.protocol import messages as m
from fl_app.server.grids.base import GridWrapper

log = logging.getLogger(__name__)
POLL_S = 0.25
FIRST_POLL_S = 0.02


class ProgressGrid(GridWrapper):
    def __init__(self, grid: GridWrapper, hospital_of: Callable[[int], object] = lambda n: n,
                 every_s: float = 60.0) -> None:
        """``hospital_of``: node id -> what to call it (its hospital number once known)."""
        super().__init__(grid)
        self.hospital_of = hospital_of
        self.every_s = every_s

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        # message id -> destination node; a message the SuperLink did not take has no id
        # (Flower logs why), and no reply is awaited for it.
        waiting = {message_id: message.metadata.dst_node_id for message, message_id
                   in zip(messages, list(self.push_messages(messages)), strict=False)
                   if message_id}
        what = _describe(messages)
        start = time.monotonic()
        next_note = start + self.every_s
        replies: list[Message] = []
        pause = FIRST_POLL_S
        while waiting:
            pulled = list(self.pull_messages(set(waiting)))
            replies += pulled
            for reply in pulled:
                waiting.pop(reply.metadata.reply_to_message_id, None)
            now = time.monotonic()
            if not waiting or (timeout is not None and now - start >= timeout):
                break
            if now >= next_note:
                pending = sorted(str(self.hospital_of(node)) for node in waiting.values())
                log.info("%s: %d of %d hospitals answered after %.0f s; waiting for "
                         "hospital %s", what, len(messages) - len(waiting), len(messages),
                         now - start, ", ".join(pending))
                next_note = now + self.every_s
            time.sleep(pause)
            pause = min(POLL_S, 2 * pause)
        return replies


def _describe(messages: list[Message]) -> str:
    """e.g. "round 3 train": the round (as the strategy's config record carries it) and the
    message type."""
    if not messages:
        return "no messages"
    first = messages[0]
    try:
        server_round = first.content[m.CONFIG_RECORD][m.SERVER_ROUND_KEY]
    except (KeyError, TypeError, ValueError):
        return first.metadata.message_type
    return f"round {server_round} {first.metadata.message_type}"
