"""What a hospital does with each message: turns Flower messages into calls on ``tasks``.

Registered with Flower by ``fl_app/client_app.py``, which imports this module only when a
message needs it (see there why).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.common.logger import log

from fl_app.client_mods import asks_for_clipping
from fl_app.hospital_state import hospital_policy, ledger_run, load_ledger, save_ledger
from fl_app.replies import (
    distributed_share_reply,
    evaluate_reply,
    preflight_reply,
    refusal_reply,
    train_reply,
)
from fl_app.secure_aggregation_mod import load_ckks_context
from protocol import messages as m
from secure_aggregation import ckks
from settings.compose import task_settings_from_yaml
from settings.secure_aggregation import SecureAggregationMode
from tasks.data.hospital_data import load_hospital_data
from tasks.errors import TaskInputError
from tasks.hospital import Hospital, refuse_audit_in_deployment
from tasks.model.compute import resolve_compute
from tasks.privacy.plan import (
    PolicyRefusal,
    PrivacyBudgetError,
    plan_dp_sgd,
    refuse_without_dp,
)


def _partition(context: Context) -> tuple[int, int]:
    """(hospital number, hospitals). With a data-path the hospital reads its own file and
    num-partitions is not needed."""
    try:
        partition_id = int(context.node_config["partition-id"])
        if _data_path(context):
            return partition_id, int(context.node_config.get("num-partitions", partition_id + 1))
        return partition_id, int(context.node_config["num-partitions"])
    except KeyError as err:
        raise TaskInputError(
            f"node {context.node_id}: node config lacks {err.args[0]!r}; start the SuperNode with "
            "--node-config 'partition-id=<k> data-path=<file>' (or num-partitions=<n> "
            "to take a share of the configured data.path)") from err


def _data_path(context: Context) -> str | None:
    path = context.node_config.get("data-path")
    return str(path) if path else None


def _hospital(msg: Message, context: Context) -> Hospital:
    settings = task_settings_from_yaml(str(msg.content[m.CONFIG_RECORD][m.TASK_KEY]))
    partition_id, num_partitions = _partition(context)
    return Hospital(settings, settings.data.labels, partition_id, num_partitions,
                    _data_path(context))


def preflight(msg: Message, context: Context) -> Message:
    """Check this hospital's data and privacy settings against the server's before any
    training: an empty partition, unknown labels, a delta too large for the records or a
    budget too small for one round stop the run here. What the hospital's own policy rules
    out is a refusal of this hospital only: the server sends it no work."""
    partition_id = int(context.node_config.get("partition-id", -1))
    declined = ""
    try:
        settings = task_settings_from_yaml(str(msg.content[m.CONFIG_RECORD][m.TASK_KEY]))
        partition_id, num_partitions = _partition(context)
        # A GPU or bf16 the settings ask for and this machine lacks stops the run here.
        compute = resolve_compute(settings.train)
        # No key material, or a key that is not a CKKS secret context, stops the run here.
        key = _ckks_public(context, settings.secure_aggregation.mode)
        refuse_audit_in_deployment(settings, partition_id, _data_path(context))
        data = load_hospital_data(settings.data, settings.data.labels, partition_id,
                                  num_partitions, _data_path(context))
        policy = hospital_policy(context, data.hospital)
        policy.check_records(len(data.train))
        dp = settings.privacy.dp_sgd
        distributed = settings.privacy.distributed_dp.enabled
        private = dp.enabled or distributed
        try:
            if not distributed:  # distributed DP-SGD is record-level DP too
                refuse_without_dp(dp, policy)
            if dp.enabled:
                # An unreadable ledger, or one kept with another accountant, stops the run.
                run_id = ledger_run(settings, context)
                lifetime, run = load_ledger(context, data.hospital, dp.accountant, run_id)
                plan_dp_sgd(dp, data.hospital, len(data.train), settings.train.batch_size,
                            settings.train.local_epochs, settings.planned_rounds, policy,
                            committed_noise_multiplier=run.noise_multiplier,
                            prior_history=lifetime.history(except_run=run_id))
        except PolicyRefusal as refusal:
            declined = str(refusal)
    except (TaskInputError, ValueError) as err:  # ckks.KeyMaterialError is a ValueError
        return preflight_reply(msg, partition_id, None, 0, 0, problem=str(err))
    # Under record-level DP the per-label counts of training records stay home: they are exact
    # statistics of the private records.
    withheld = private or policy.require_dp
    counts = None if withheld else data.label_counts(settings.data.labels)
    # Like label counts, an exact count of the hospital's records: withheld under DP-SGD.
    dropped = data.report.empty_texts_dropped if data.report and not withheld else 0
    if data.report:
        log(INFO, "hospital %s: %s", partition_id, data.report.summary())
    log(INFO, "hospital %s computes on %s", partition_id, compute.describe())
    return preflight_reply(msg, partition_id, counts, len(data.train), len(data.eval),
                           empty_texts_dropped=dropped, declined=declined, ckks_public=key)


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
    hospital = _hospital(msg, context)
    config = msg.content[m.CONFIG_RECORD]
    global_state = msg.content[m.ARRAYS_RECORD].to_torch_state_dict()
    policy = hospital_policy(context, hospital.data.hospital)
    server_round = int(config.get(m.SERVER_ROUND_KEY, 0))
    privacy = hospital.settings.privacy
    lifetime = ledger = None
    run_id = ledger_run(hospital.settings, context)
    if hospital.uses_distributed_dp and not config.get(m.SECURE_AGGREGATION_ON, False):
        # Its noise is only a share: in the clear, the sum would be too little protected.
        return Message(Error(code=m.SECURE_AGGREGATION_FAILED, reason=(
            f"hospital {hospital.data.hospital}: distributed DP sends its noisy gradient sum "
            "only through secure aggregation; refused to send it in the clear")), reply_to=msg)
    if hospital.is_private:
        accountant = (privacy.distributed_dp if hospital.uses_distributed_dp
                      else privacy.dp_sgd).accountant
        lifetime, ledger = load_ledger(context, hospital.data.hospital, accountant, run_id)
    prior = lifetime.history(except_run=run_id) if lifetime else ()
    try:
        if hospital.uses_distributed_dp:
            share, outcome = hospital.distributed_step(global_state, server_round, ledger,
                                                       policy, prior)
        else:
            state, outcome = hospital.train(
                global_state, server_round, proximal_mu=float(config.get(m.PROXIMAL_MU_KEY, 0.0)),
                ledger=ledger, policy=policy, prior_history=prior)
    except PrivacyBudgetError as refusal:
        return refusal_reply(msg, str(refusal))
    if lifetime is not None:
        # Before the update leaves: spending is never forgotten.
        save_ledger(context, lifetime, run_id)
    if hospital.uses_distributed_dp:  # summed, not averaged: every hospital weighs 1
        return distributed_share_reply(msg, share, outcome, hospital.data.hospital,
                                       hospital.share_lattice, privacy.distributed_dp.threshold)
    return train_reply(msg, state, outcome, hospital.data.hospital,
                       equal_weight=asks_for_clipping(msg))


def evaluate(msg: Message, context: Context) -> Message:
    hospital = _hospital(msg, context)
    arrays: ArrayRecord = msg.content[m.ARRAYS_RECORD]
    outcome = hospital.evaluate(arrays.to_torch_state_dict())
    release = hospital_policy(context, hospital.data.hospital).eval_release(
        hospital.is_private)
    return evaluate_reply(msg, outcome, hospital.data.hospital, release)
