"""A ServerApp that runs the product's own server (``fl_app.server.server_app.main``) once per
scenario, each through a Grid that rewrites the task settings of every message it sends: a
server that skips its own checks, or lies. Used by ``tests/test_hostile_server_run.py``,
which copies this file into a Flower app of its own for a real ``flwr run``.

Run config ``scenarios``: JSON, a list of ``{"overrides": "...", "tamper": {dotted: value}}``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from clinical_fl.protocol import messages as m
from fl_app.server.grids.base import GridWrapper
from fl_app.server.server_app import main as product_main

log = logging.getLogger(__name__)
app = ServerApp()


def _value(value: object) -> object:
    return math.nan if value == "nan" else math.inf if value == "inf" else value


class TamperingGrid(GridWrapper):
    """Every outgoing message's task settings rewritten with ``changes``."""

    def __init__(self, grid: Grid, changes: dict[str, object]) -> None:
        super().__init__(grid)
        self.changes = {k: _value(v) for k, v in changes.items()}

    def _tamper(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            config = msg.content.config_records.get(m.CONFIG_RECORD) if msg.has_content() \
                else None
            if config is None or m.TASK_KEY not in config or not self.changes:
                continue
            tree = yaml.safe_load(str(config[m.TASK_KEY]))
            for dotted, value in self.changes.items():
                node = tree
                *parents, leaf = dotted.split(".")
                for name in parents:
                    node = node[name]
                node[leaf] = value
            # A copy per message: Flower's strategies share one RecordDict between messages.
            records = dict(msg.content.items())
            records[m.CONFIG_RECORD] = ConfigRecord(
                {**dict(config.items()), m.TASK_KEY: yaml.safe_dump(tree, sort_keys=False)})
            msg.content = RecordDict(records)
        return messages

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(self._tamper(messages), timeout=timeout)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._tamper(messages))


@app.main()
def main(grid: Grid, context: Context) -> None:
    for number, scenario in enumerate(json.loads(str(context.run_config["scenarios"]))):
        scenario_context = Context(run_id=context.run_id, node_id=context.node_id,
                                   node_config=context.node_config, state=RecordDict(),
                                   run_config={"overrides": scenario["overrides"]})
        try:
            product_main(TamperingGrid(grid, scenario.get("tamper", {})), scenario_context)
            log.warning("scenario %d: the server's run ended", number)
        except Exception as err:  # noqa: BLE001 - the next scenario still runs
            log.warning("scenario %d: the server's run stopped: %s", number, err)
