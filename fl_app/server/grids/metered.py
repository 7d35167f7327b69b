"""A Grid that counts what crosses the wire, so bytes per round are measured, not estimated."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fl_app.server.grids.base import GridWrapper


def _config_bytes(record: ConfigRecord) -> int:
    # Flower's ConfigRecord.count_bytes raises on an empty string value, so count
    # the same way it does (keys + 1 byte per char/bool, 8 per number) ourselves.
    total = 0
    for key, value in record.items():
        total += len(key)
        for item in value if isinstance(value, list) else [value]:
            total += len(item) if isinstance(item, str | bytes) else (
                1 if isinstance(item, bool) else 8)
    return total


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays, metrics and config a message carries."""
    return sum(_config_bytes(record) if isinstance(record, ConfigRecord)
               else record.count_bytes() for record in content.values())


class MeteredGrid(GridWrapper):
    """Delegates to the real Grid and adds up the payload of every message sent and received.

    The strategy never knows: it is handed this Grid instead of the original.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.replies_with_error = 0

    def take_counts(self) -> tuple[int, int, int]:
        """(bytes sent, bytes received, error replies) since the last call, then reset."""
        counts = (self.bytes_sent, self.bytes_received, self.replies_with_error)
        self.bytes_sent = self.bytes_received = self.replies_with_error = 0
        return counts

    def _count(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_content():
                self.bytes_received += payload_bytes(reply.content)
            else:
                self.replies_with_error += 1
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_sent += sum(payload_bytes(m.content) for m in messages if m.has_content())
        return self._count(self._grid.send_and_receive(messages, timeout=timeout))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.bytes_sent += sum(payload_bytes(m.content) for m in messages if m.has_content())
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._count(self._grid.pull_messages(message_ids))
