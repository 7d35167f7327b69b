"""Before any training: every hospital checks its data against the server's settings.

A hospital with an empty partition or labels outside the global set stops the
run here, with its own message, instead of failing (or worse, silently
dropping out) in the middle of round one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.refusals import explain_reason
from tasks.errors import HospitalDataError

PREFLIGHT_TYPE = f"query.{m.PREFLIGHT_QUERY}"


@dataclass
class HospitalReport:
    node_id: int
    hospital: int
    train_records: int
    eval_records: int
    label_counts: list[int]  # empty: not shared (DP-SGD)
    empty_texts_dropped: int = 0
    declined: str = ""  # the hospital's privacy policy refuses this run: why
    # secure_aggregation=ckks: the public half of the hospital's key material, and its name.
    ckks_public: bytes | None = None
    ckks_fingerprint: str = ""


def wait_for_hospitals(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """Node ids once at least ``minimum`` hospitals are connected."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise HospitalDataError(f"only {len(nodes)} hospital(s) connected after "
                                    f"{timeout_s:.0f} s; strategy.min_hospitals={minimum}")
        time.sleep(1.0)


def run_preflight(grid: Grid, config: ConfigRecord, minimum: int,
                  timeout_s: float) -> list[HospitalReport]:
    nodes = wait_for_hospitals(grid, minimum, timeout_s)
    messages = [Message(RecordDict({m.CONFIG_RECORD: config}), dst_node_id=node,
                        message_type=PREFLIGHT_TYPE) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    problems, reports = [], []
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            problems.append(f"node {node}: {explain_reason(reply.error.reason)}")
            continue
        status = reply.content[m.PREFLIGHT_STATUS_RECORD]
        if not status[m.PREFLIGHT_OK]:
            problems.append(f"hospital {status.get(m.PREFLIGHT_HOSPITAL, '?')} (node {node}): "
                            f"{explain_reason(str(status[m.PREFLIGHT_PROBLEM]))}")
            continue
        declined = str(status.get(m.PREFLIGHT_DECLINED, ""))
        counts = reply.content[m.PREFLIGHT_COUNTS_RECORD]
        key = reply.content.get(m.PREFLIGHT_CKKS_RECORD)
        reports.append(HospitalReport(
            node, int(status[m.PREFLIGHT_HOSPITAL]), int(counts[m.TRAIN_RECORDS]),
            int(counts[m.EVAL_RECORDS]), [int(c) for c in counts.get(m.LABEL_COUNTS, [])],
            int(counts.get(m.EMPTY_TEXTS_DROPPED, 0)),
            f"hospital {int(status[m.PREFLIGHT_HOSPITAL])}: {explain_reason(declined)}"
            if declined else "",
            bytes(key[m.CKKS_PUBLIC]) if key else None,
            str(key[m.CKKS_FINGERPRINT]) if key else ""))
    problems += [f"node {node}: no preflight reply within {timeout_s:.0f} s"
                 for node in nodes if node not in answered]
    if problems:
        raise HospitalDataError("hospital data check failed before training:\n  "
                                + "\n  ".join(problems))
    return sorted(reports, key=lambda r: r.hospital)
