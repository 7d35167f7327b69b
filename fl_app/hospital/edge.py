"""The hospital's edge: the outermost mod around every handler, so nothing leaves as text.

When a ClientApp raises, Flower sends ``str(exception)`` back to the server as the error
reason, and exception text can hold anything: a cell value, a column header, a path. Here
every exception becomes a refusal from the fixed table in ``clinical_fl/protocol/refusals.py``
(a code, the setting key it concerns, counts), and the details (message, traceback) go to the
hospital's own log, ``hospital.log`` in its state directory, which nothing sends anywhere.
Replies built inside are checked too: an error reason or a preflight problem that is not a
refusal line is replaced by ``internal-error`` before it leaves.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from logging import WARNING

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.refusals import Refusal, is_refusal_line, make_refusal
from fl_app.hospital.node_config import hospital_name, state_dir

HOSPITAL_LOG = "hospital.log"

# Exception class name -> refusal name; the first class in an exception's MRO that is listed
# decides. By name, so that this module imports none of the heavy modules they live in.
REFUSAL_OF_CLASS = {
    "PolicyRefusal": "policy-refused",
    "PrivacyBudgetError": "privacy-budget-refused",
    "PolicyError": "policy-invalid",
    "LedgerError": "ledger-unreadable",
    "UnknownLabelsError": "labels-unknown",
    "DataMappingRefused": "data-mapping-refused",
    "DataFileError": "data-unreadable",
    "HospitalDataError": "data-too-small",
    "ModelNotFoundError": "model-unavailable",
    "ComputeUnavailableError": "compute-unavailable",
    "KeyMaterialError": "key-material",
    "StageRefused": "stage-refused",
    "KeyUnauthenticated": "secagg-unauthenticated",
    "ViewInconsistent": "secagg-inconsistent",
    "ThresholdRefused": "secagg-threshold-refused",
    "SecAggError": "stage-refused",
    "InvalidToken": "stage-refused",
    "PrivacyPlanError": "privacy-plan-invalid",
    "ClippingRefused": "privacy-plan-invalid",
    "SettingsUnreadable": "settings-unreadable",
    "EvaluationsExhausted": "evaluations-exhausted",
    "ConfigError": "settings-invalid",
    "TaskInputError": "settings-invalid",
}


@lru_cache(maxsize=1)
def allowed_keys() -> frozenset[str]:
    """Every key a refusal may name: the task settings' dotted keys (and their sections),
    the hospital's policy and node config keys, and the round's own config keys that a
    hospital checks (FedProx's proximal term)."""
    from omegaconf import OmegaConf

    from clinical_fl.protocol.messages import PROXIMAL_MU_KEY
    from clinical_fl.settings.task import TaskSettings
    from tasks.privacy.policy import KEYS, NODE_KEYS

    keys: set[str] = set(KEYS) | set(NODE_KEYS) | {PROXIMAL_MU_KEY}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for name, child in node.items():
                keys.add(f"{prefix}{name}")
                walk(child, f"{prefix}{name}.")

    walk(OmegaConf.to_container(OmegaConf.structured(TaskSettings), enum_to_str=True), "")
    return frozenset(keys)


def refusal_for(err: BaseException) -> Refusal:
    """The refusal an exception leaves the hospital as: its class decides the code; its
    ``key`` and ``counts`` attributes, if any, what else may be said."""
    name = next((REFUSAL_OF_CLASS[cls.__name__] for cls in type(err).__mro__
                 if cls.__name__ in REFUSAL_OF_CLASS), "internal-error")
    return make_refusal(name, str(getattr(err, "key", "") or ""),
                        getattr(err, "counts", None), allowed_keys())


def refusal_message(msg: Message, refusal: Refusal) -> Message:
    return Message(Error(code=refusal.code, reason=refusal.wire()), reply_to=msg)


def write_hospital_log(context: Context, text: str) -> None:
    """Append to the hospital's own log, in its state directory: the only place details are
    written. A plain file append, not Python's logging: no handler, propagation or logging
    configuration of another library can carry it to Flower's log (in simulation, the
    server's console). A hospital without a writable state directory loses the details; it
    never sends them."""
    path = state_dir(context) / HOSPITAL_LOG
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    # Only an entry's first line starts with a time: text from the server (a value quoted in
    # an error) cannot forge an entry of its own.
    body = "\n    ".join(text.rstrip().splitlines())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {body}\n")
    except OSError:
        pass


class _ToHospitalLog(logging.Handler):
    """What ``tasks`` logs while a message is handled (e.g. how many notes are longer than
    the windows read) goes to the hospital's own log, not to Flower's: it is a statistic of
    the records."""

    def __init__(self, context: Context) -> None:
        super().__init__()
        self.context = context

    def emit(self, record: logging.LogRecord) -> None:
        write_hospital_log(self.context, f"{record.name}: {record.getMessage()}")


@contextmanager
def _task_logs_kept_home(context: Context) -> Iterator[None]:
    logger = logging.getLogger("tasks")
    handler, propagated, level = _ToHospitalLog(context), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)  # training progress is INFO (tasks/learning/progress.py)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagated
        logger.setLevel(level)


def _who(context: Context) -> str:
    return hospital_name(context)


def _record(context: Context, msg: Message, refusal: Refusal, detail: str) -> None:
    """Details to the hospital's log; the one refusal line to Flower's log."""
    write_hospital_log(context, f"{msg.metadata.message_type} message (round {_round(msg)!r}): "
                                f"refused as {refusal.wire()}\n{detail}")
    log(WARNING, "%s: %s refused: %s (details in its %s)", _who(context),
        msg.metadata.message_type, refusal.wire(), HOSPITAL_LOG)


def _round(msg: Message) -> object:
    try:
        return msg.content[m.CONFIG_RECORD].get(m.SERVER_ROUND_KEY, "-")
    except (KeyError, TypeError, ValueError):
        return "-"


def _checked(msg: Message, reply: Message, context: Context) -> Message:
    """A reply built inside, as it may leave: error reasons and preflight findings are
    refusal lines, or are replaced by ``internal-error``."""
    if reply.has_error():
        if not is_refusal_line(reply.error.reason):
            refusal = make_refusal("internal-error")
            _record(context, msg, refusal, f"error reply not in the protocol's form: code "
                    f"{reply.error.code}, reason {reply.error.reason!r}")
            return refusal_message(msg, refusal)
        return reply
    status = (reply.content.config_records.get(m.PREFLIGHT_STATUS_RECORD)
              if reply.has_content() else None)
    if status is not None:
        for field in (m.PREFLIGHT_PROBLEM, m.PREFLIGHT_DECLINED):
            text = str(status.get(field, ""))
            if text and not is_refusal_line(text):
                refusal = make_refusal("internal-error")
                _record(context, msg, refusal, f"preflight {field} not a refusal line: {text!r}")
                status[field] = refusal.wire()
                status[m.PREFLIGHT_OK] = False
    return reply


def hospital_edge_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost around every handler: any exception becomes a refusal line."""
    try:
        with _task_logs_kept_home(context):
            reply = call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - nothing may leave as exception text
        refusal = refusal_for(err)
        _record(context, msg, refusal, "".join(traceback.format_exception(err)))
        return refusal_message(msg, refusal)
    return _checked(msg, reply, context)
