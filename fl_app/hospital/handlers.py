"""What a hospital does with each message: turns Flower messages into calls on ``tasks``.

Registered with Flower by ``fl_app/hospital/client_app.py``, which imports this module only when a
message needs it (see there why).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common.logger import log

from clinical_fl.protocol import messages as m
from clinical_fl.secure_aggregation import ckks
from clinical_fl.settings.secure_aggregation import SecureAggregationMode
from clinical_fl.settings.task import TaskSettings
from fl_app.hospital.clipping_mod import ClippingRefused, asks_for_clipping
from fl_app.hospital.edge import refusal_for, write_hospital_log
from fl_app.hospital.node_config import hospital_number, partition
from fl_app.hospital.received import (
    check_distributed_round,
    received_lr_factor,
    received_proximal_mu,
    received_settings,
)
from fl_app.hospital.replies import (
    distributed_share_reply,
    evaluate_reply,
    preflight_reply,
    train_reply,
)
from fl_app.hospital.secure_aggregation_mod import StageRefused, load_ckks_context
from fl_app.hospital.state import (
    count_evaluation,
    hospital_policy,
    ledger_run,
    load_ledger,
    save_ledger,
    state_locked,
)
from tasks.data.hospital_data import HospitalData, load_hospital_data
from tasks.errors import UnknownLabelsError
from tasks.hospital import Hospital, refuse_audit_in_deployment, with_audit_canaries
from tasks.model.compute import resolve_compute
from tasks.privacy.mechanisms import RecordLevelPrivacy, record_level_privacy
from tasks.privacy.plan import PolicyRefusal
from tasks.privacy.policy import HospitalPolicy


@dataclass
class Received:
    """A message's task settings as this hospital takes them, and who it is."""

    settings: TaskSettings
    policy: HospitalPolicy
    partition_id: int
    num_partitions: int


def _received(msg: Message, context: Context) -> Received:
    """Everything checked that needs no data: the node config, the hospital's policy, the
    server's settings with the hospital's data mapping in place."""
    policy = hospital_policy(context, hospital_number(context))
    partition_id, num_partitions = partition(context, reads_own_file=bool(policy.data_path))
    settings = received_settings(msg, policy)
    # Before any step or read, in every handler: a deployed hospital (data-path or state-dir)
    # or one with a policy file takes no audit canaries, whatever data it reads.
    refuse_audit_in_deployment(settings, partition_id, policy.owns_data or policy.data_path)
    return Received(settings, policy, partition_id, num_partitions)


def _hospital(received: Received) -> Hospital:
    with _exact_counts_withheld(received):
        return Hospital(received.settings, received.settings.data.labels,
                        received.partition_id, received.num_partitions,
                        received.policy.data_path)


@contextmanager
def _exact_counts_withheld(received: Received) -> Iterator[None]:
    """Under DP (or a policy that requires it) a refusal over unknown labels says so without
    the number of records: probed label by label, the counts would give the server the exact
    label histogram that preflight withholds."""
    try:
        yield
    except UnknownLabelsError as err:
        if received.settings.privacy.record_level or received.policy.require_dp:
            err.counts = {}
        raise


def preflight(msg: Message, context: Context) -> Message:
    """Check this hospital's data and privacy settings against the server's before any
    training: an empty partition, unknown labels, a delta too large for the records or a
    budget too small for one round stop the run here (an error the hospital's edge turns into
    a refusal code). What the hospital's own policy rules out is a refusal of this hospital
    only: the server sends it no work."""
    try:
        received = _received(msg, context)
    except PolicyRefusal as refusal:  # e.g. de-identification switched off
        return _declined(msg, context, refusal)
    settings, policy = received.settings, received.policy
    # A GPU or bf16 the settings ask for and this machine lacks stops the run here.
    compute = resolve_compute(settings.train)
    # No key material, or a key that is not a CKKS secret context, stops the run here.
    key = _ckks_public(context, settings.secure_aggregation.mode)
    with _exact_counts_withheld(received):
        data = load_hospital_data(settings.data, settings.data.labels, received.partition_id,
                                  received.num_partitions, policy.data_path)
    # An audit's canaries (simulation only) are training records like any other: in the counts
    # the server plans with (distributed DP's sampling rate, secure aggregation's max weight).
    data.train = with_audit_canaries(settings, received.partition_id, policy.data_path,
                                     data.train)
    policy.check_records(len(data.train))
    mechanism = record_level_privacy(settings.privacy)
    released = None
    try:
        mechanism.check_policy(policy)
        if mechanism.plans_at_preflight:
            with state_locked(context):
                released = _plan_at_preflight(context, mechanism, settings, policy, data)
    except PolicyRefusal as refusal:
        return _declined(msg, context, refusal, data.hospital, len(data.train), len(data.eval))
    # Under record-level DP the exact per-label counts stay home: they are statistics of the
    # private records. Only their noisy release, booked in the ledger, may leave.
    withheld = mechanism.private or policy.require_dp
    counts = released if withheld else data.label_counts(settings.data.labels)
    # Like label counts, an exact count of the hospital's records: withheld under DP-SGD.
    dropped = data.report.empty_texts_dropped if data.report and not withheld else 0
    if data.report:
        write_hospital_log(context, f"hospital {received.partition_id}: "
                                    f"{data.report.summary()}")
    log(INFO, "hospital %s computes on %s", received.partition_id, compute.describe())
    return preflight_reply(msg, received.partition_id, counts, len(data.train), len(data.eval),
                           empty_texts_dropped=dropped, ckks_public=key)


def _plan_at_preflight(context: Context, mechanism: RecordLevelPrivacy,
                       settings: TaskSettings, policy: HospitalPolicy,
                       data: HospitalData) -> list[int] | None:
    """The mechanism's check of its plan before round 1, against this hospital's ledgers (a
    refusal raises), and any label counts it releases: booked and saved before they leave."""
    # An unreadable ledger stops the run; one kept with another accountant is read, its
    # whole history composed with this run's.
    run_id = ledger_run(settings, context)
    lifetime, run = load_ledger(context, data.hospital, mechanism.accountant(), run_id)
    booked = len(run.history)
    released = mechanism.preflight(settings, data, policy, run,
                                   lifetime.history(except_run=run_id))
    if len(run.history) != booked:
        save_ledger(context, lifetime, run_id)  # booked before the counts leave
    return released


def _declined(msg: Message, context: Context, refusal: PolicyRefusal,
              hospital: int | None = None, train_records: int = 0,
              eval_records: int = 0) -> Message:
    """This hospital's policy keeps it out of the run: a refusal code (and its record counts,
    where it read its data), the details kept here."""
    line = refusal_for(refusal)
    write_hospital_log(context, f"preflight declined as {line.wire()}: {refusal}")
    number = hospital if hospital is not None else hospital_number(context)
    return preflight_reply(msg, number, None, train_records, eval_records,
                           declined=line.wire())


def _ckks_public(context: Context, mode: SecureAggregationMode) -> ConfigRecord | None:
    """With CKKS, the public half of this hospital's key material, for the server to check
    that every hospital holds the same key (and to add ciphertexts with)."""
    if mode != SecureAggregationMode.ckks:
        return None
    key = load_ckks_context(context)
    public = ckks.public_bytes(key)
    return ConfigRecord({m.CKKS_PUBLIC: public, m.CKKS_FINGERPRINT: ckks.fingerprint(public),
                         m.CKKS_PARAMETERS: ckks.describe(key)})


def train(msg: Message, context: Context) -> Message:
    received = _received(msg, context)
    settings, policy = received.settings, received.policy
    config = msg.content[m.CONFIG_RECORD]
    server_round = int(config.get(m.SERVER_ROUND_KEY, 0))
    lr_factor = received_lr_factor(settings, config)
    proximal_mu = received_proximal_mu(settings, config)
    privacy = settings.privacy
    mechanism = record_level_privacy(privacy)
    if mechanism.sends_share:
        if asks_for_clipping(msg):
            # Scaling a share scales its noise share; the mod checks this too, before.
            raise ClippingRefused("client-level clipping of a distributed DP share: refused",
                                  key="privacy.distributed_dp")
        if not config.get(m.SECURE_AGGREGATION_ON, False):
            # Its noise is only a share: in the clear, the sum would be too little protected.
            raise StageRefused("distributed DP sends its noisy gradient sum only through "
                               "secure aggregation; refused to send it in the clear")
        check_distributed_round(settings, config)
    hospital = _hospital(received)
    global_state = msg.content[m.ARRAYS_RECORD].to_torch_state_dict()
    lifetime = ledger = None
    run_id = ledger_run(settings, context)
    with state_locked(context) if mechanism.private else nullcontext():
        if mechanism.private:
            lifetime, ledger = load_ledger(context, hospital.data.hospital,
                                           mechanism.accountant(), run_id)
        prior = lifetime.history(except_run=run_id) if lifetime else ()
        # A refusal (PrivacyBudgetError) leaves through the hospital's edge as a code.
        arrays, outcome = hospital.train(
            global_state, server_round, proximal_mu=proximal_mu, ledger=ledger, policy=policy,
            prior_history=prior, lr_factor=lr_factor)
        if lifetime is not None:
            # Before the update leaves: spending is never forgotten.
            save_ledger(context, lifetime, run_id)
    if mechanism.sends_share:  # summed, not averaged: every hospital weighs 1
        return distributed_share_reply(msg, arrays, outcome, hospital.data.hospital,
                                       hospital.share_lattice, privacy.distributed_dp.threshold)
    return train_reply(msg, arrays, outcome, hospital.data.hospital,
                       equal_weight=asks_for_clipping(msg))


def evaluate(msg: Message, context: Context) -> Message:
    received = _received(msg, context)
    # Counted before scoring: held-out records are scored without noise.
    count_evaluation(context, received.settings, received.policy)
    hospital = _hospital(received)
    arrays: ArrayRecord = msg.content[m.ARRAYS_RECORD]
    outcome = hospital.evaluate(arrays.to_torch_state_dict())
    release = received.policy.eval_release(hospital.is_private)
    return evaluate_reply(msg, outcome, hospital.data.hospital, release)
