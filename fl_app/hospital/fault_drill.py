"""The fault drill: a hospital that sends what a broken hospital would, on purpose, so a
coordinator (and the tests) can see the server's defences work: a NaN or Inf after a numeric
blow-up, arrays of the wrong keys, shapes or dtype after a version mismatch, values a
million times too large, a hospital that stalls, one lost mid-round, a process that dies.

Which hospital, which fault, which rounds: ``drill.faults`` (``"<hospital>:<fault>"`` or
``"<hospital>:<fault>@<round>"``) in simulation; in a deployment the hospital's own node
config ``fault-drill=<fault>`` or ``<fault>@<round>`` (a deployed hospital refuses a drill
the server asks for: breaking a hospital is the hospital's decision).
"""

from __future__ import annotations

import os
import time
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from clinical_fl.protocol import messages as m
from clinical_fl.settings.recovery import STALL_SECONDS, Fault, parse_fault
from fl_app.hospital.node_config import (
    FAULT_DRILL,
    hospital_number,
    is_deployed,
    own_fault_drill,
)
from tasks.errors import TaskInputError

NODE_CONFIG_KEY = FAULT_DRILL


class DrilledCrash(RuntimeError):
    """The drill's crash: the handler fails, Flower sends an error reply."""


def fault_for(msg: Message, context: Context) -> Fault | None:
    config = msg.content.config_records.get(m.CONFIG_RECORD)
    if config is None or m.TASK_KEY not in config:
        return None
    server_round = int(config.get(m.SERVER_ROUND_KEY, 0))
    hospital = hospital_number(context)
    own = own_fault_drill(context)
    if own:
        fault = parse_fault(f"{hospital}:{own}", deployed=True)
        return fault.fault if fault.applies(hospital, server_round) else None
    # Imported here: the ClientApp's module stays light (see client_app.py); a train message
    # reaches the handlers, which import it anyway.
    from clinical_fl.settings.compose import task_settings_from_yaml
    from fl_app.hospital.received import task_yaml

    drill = task_settings_from_yaml(task_yaml(msg)).drill
    if drill.faults and is_deployed(context):
        raise TaskInputError(f"hospital {hospital}: the server asks for a fault drill "
                             f"(drill.faults={drill.faults}); a deployed hospital only drills "
                             f"by its own node config ({NODE_CONFIG_KEY}=<fault>)",
                             key="drill.faults")
    return drill.fault_for(hospital, server_round)


def broken(record: ArrayRecord, fault: Fault) -> ArrayRecord:
    """The reply's arrays as the fault would leave them."""
    arrays = {k: v.numpy().copy() for k, v in record.items()}
    first = next(iter(arrays))
    if fault in (Fault.nan, Fault.inf):
        arrays[first].flat[0] = np.nan if fault == Fault.nan else np.inf
    elif fault == Fault.missing_key:
        del arrays[first]
    elif fault == Fault.wrong_shape:
        arrays[first] = arrays[first][:-1]
    elif fault == Fault.float64:
        arrays = {k: v.astype(np.float64) for k, v in arrays.items()}
    elif fault == Fault.huge:
        arrays = {k: v * np.float32(1e6) for k, v in arrays.items()}
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def fault_drill_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    fault = fault_for(msg, context)
    if fault is None:
        return call_next(msg, context)
    hospital = hospital_number(context)
    log(WARNING, "hospital %s: fault drill: %s", hospital, fault.value)
    if fault == Fault.stall:
        time.sleep(STALL_SECONDS)
    reply = call_next(msg, context)  # mid-round: the training happens, the reply never leaves
    if fault == Fault.crash:
        raise DrilledCrash(f"hospital {hospital}: fault drill: crash after training")
    if fault == Fault.exit:
        os._exit(17)
    if reply.has_error():
        return reply
    for name, record in list(reply.content.array_records.items()):
        reply.content.array_records[name] = broken(record, fault)
    return reply
