"""A mistaken or malicious server, message by message, against one hospital's real ClientApp
(its edge, secure-aggregation and clipping mods and its handlers), in process.

The hospital holds an export with a canary in every cell and in one column's name, a policy
(max-epsilon 3, require-dp, its own data mapping) and a privacy ledger that an honest round
wrote. For every hostile message: the reply is a refusal line from the protocol's table with
the expected code and key, no training step (or scoring) ran, the ledger is byte for byte
unchanged and still readable, and no canary reaches the reply, its error reason or the
process's log output (in simulation, the server's console).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.refusals import is_refusal_line, parse_refusal
from clinical_fl.secure_aggregation import ckks
from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.privacy import Accountant
from fl_app.hospital.client_app import app
from tasks.privacy.ledger import LEDGER_FILE, LedgerStore
from tests.hospital_process import initial_arrays
from tests.hostile_server import (
    CANARY,
    CANARY_COLUMN,
    LABELS,
    holds_canary,
    spy_on_steps,
    tampered,
    task_identity,
    write_canary_export,
)
from tests.secure_hospitals import provision_signing_keys
from tests.support import task

NODE = 7
OTHERS = [8, 9]  # the round's other hospitals, as the server names them
DP_RUN, DISTRIBUTED_RUN = 9, 10


@pytest.fixture(scope="module")
def hospital(tiny_bert, tmp_path_factory):
    """The hospital's files, its node config, and the honest task settings of a DP-SGD run
    and of a distributed-DP run over CKKS."""
    root = tmp_path_factory.mktemp("hostile")
    export = write_canary_export(root / "export" / "notes.csv", hospital=0)
    secret = ckks.simulation_secret_context(root / "ckks")
    node_config = {"partition-id": 0, "state-dir": str(root / "state"),
                   "data-path": str(export), "text-column": "text", "label-column": "label",
                   "max-epsilon": 3.0, "require-dp": True, "deid": "allowed",
                   "ckks-context": str(secret)}
    signer = Context(run_id=0, node_id=NODE, node_config=node_config, state=RecordDict(),
                     run_config={})
    provision_signing_keys([signer], root / "signing")
    files = ("data=files", f"data.labels=[{','.join(LABELS)}]", "train.batch_size=8")
    dp = task(tiny_bert, *files, "privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=2",
              "train.local_epochs=1", labels=LABELS, planned_rounds=2)
    distributed = task(tiny_bert, *files, "privacy=distributed_dp", "secure_aggregation=ckks",
                       "privacy.distributed_dp.target_epsilon=null",
                       "privacy.distributed_dp.noise_multiplier=5.0", labels=LABELS,
                       planned_rounds=4)
    distributed.privacy.distributed_dp = replace(
        distributed.privacy.distributed_dp, sample_rate=0.2, threshold=2, target_delta=1e-5)
    return {"root": root, "state": root / "state", "node_config": node_config,
            "dp": task_settings_to_yaml(dp), "distributed": task_settings_to_yaml(distributed),
            "arrays": initial_arrays(task_settings_to_yaml(dp))}


def _context(hospital, run_id, **node_config):
    return Context(run_id=run_id, node_id=NODE, state=RecordDict(), run_config={},
                   node_config={**hospital["node_config"], **node_config})


def _message(hospital, kind, task_yaml, record=None, content=None, extra=None):
    config = ConfigRecord({m.SERVER_ROUND_KEY: 1, **(extra or {})} if task_yaml is None else
                          {m.TASK_KEY: task_yaml, m.SERVER_ROUND_KEY: 1, **(extra or {})})
    parts = {m.CONFIG_RECORD: config}
    if kind in ("train", "evaluate"):
        parts[m.ARRAYS_RECORD] = hospital["arrays"]
    if record is not None:
        parts[m.SECAGG_RECORD] = ConfigRecord(record)
    message_type = {"preflight": f"query.{m.PREFLIGHT_QUERY}"}.get(kind, kind)
    return Message(RecordDict(content or parts), dst_node_id=NODE, message_type=message_type)


def _collect(threshold=2, nodes=None):
    """A CKKS collect stage: the round's threshold and hospitals, as the server states them."""
    return {m.SECAGG_STAGE: m.STAGE_CKKS_COLLECT, m.SECAGG_ROUND: 1,
            m.SECAGG_THRESHOLD: threshold, m.SECAGG_NODES: nodes or [NODE, *OTHERS],
            m.SECAGG_MAX_WEIGHT: 1.0}


@pytest.fixture(scope="module")
def honest_ledger(hospital, process_identity_module):
    """One honest DP-SGD round and one honest distributed round: the setup trains, and writes
    the ledger that every hostile message must leave as it is."""
    reply = app(_message(hospital, "train", hospital["dp"]), _context(hospital, DP_RUN))
    assert not reply.has_error(), reply.error.reason
    assert 0 < reply.content[m.METRICS_RECORD][m.EPSILON] <= 2.0
    reply = app(_message(hospital, "train", hospital["distributed"], _collect()),
                _context(hospital, DISTRIBUTED_RUN))
    assert not reply.has_error(), reply.error.reason
    ledger = (hospital["state"] / LEDGER_FILE).read_bytes()
    assert len(LedgerStore(hospital["state"]).load(0, Accountant.rdp).runs) == 2
    return ledger


@pytest.fixture(scope="module")
def process_identity_module():
    with task_identity(DP_RUN, NODE):
        yield


@pytest.fixture
def spy(monkeypatch):
    return spy_on_steps(monkeypatch)


def _task(hospital, base, changes):
    return tampered(hospital[base], changes) if changes else hospital[base]


def _oversized(hospital):
    return hospital["dp"] + "\n# " + "x" * (300 * 1024) + "\n"


TRAIN, DIST = "dp", "distributed"
CASES = [
    # id, kind, base settings, changes, secure-aggregation record, node config, expected, key
    # -- the data mapping is the hospital's ---------------------------------------------
    ("label-column-text", "train", TRAIN, {"data.label_column": "text"}, None, {},
     "data-mapping-refused", "data.label_column"),
    *[(f"label-column-{column}", "train", TRAIN, {"data.label_column": column}, None, {},
       "data-mapping-refused", "data.label_column")
      for column in ("patient_name", "mrn", "dob", CANARY_COLUMN)],
    ("text-column-name", "train", TRAIN, {"data.text_column": "patient_name"}, None, {},
     "data-mapping-refused", "data.text_column"),
    ("missing-column", "train", TRAIN, {"data.text_column": "zzz"}, None, {},
     "data-mapping-refused", "data.text_column"),
    ("another-data-path", "train", TRAIN, {"data.path": "/etc/hosts"}, None, {},
     "data-mapping-refused", "data.path"),
    ("eval-fraction-0.99", "train", TRAIN, {"data.eval_fraction": 0.99}, None, {},
     "data-mapping-refused", "data.eval_fraction"),
    ("deid-off", "train", TRAIN, {}, None, {"deid": "required"},
     "policy-refused", "data.deid.enabled"),
    ("own-mapping-broken", "train", TRAIN, {}, None, {"label-column": "zzz"},
     "data-unreadable", "data.label_column"),
    ("unknown-labels", "train", TRAIN, {"data.labels": [*LABELS[:3], "zzz"]}, None, {},
     "labels-unknown", "data.labels"),
    ("evaluate-label-column-text", "evaluate", TRAIN, {"data.label_column": "text"}, None, {},
     "data-mapping-refused", "data.label_column"),
    ("evaluate-eval-fraction", "evaluate", TRAIN, {"data.eval_fraction": 0.99}, None, {},
     "data-mapping-refused", "data.eval_fraction"),
    ("preflight-label-column-text", "preflight", TRAIN, {"data.label_column": "text"}, None,
     {}, "data-mapping-refused", "data.label_column"),
    # -- distributed DP's plan, checked before any step ----------------------------------
    *[(f"sigma-{value}", "train", DIST, {"privacy.distributed_dp.noise_multiplier": value},
       _collect(), {}, "settings-invalid", "privacy.distributed_dp.noise_multiplier")
      for value in (-1.0, 0.0, math.nan, math.inf)],
    ("sigma-1e-9", "train", DIST, {"privacy.distributed_dp.noise_multiplier": 1e-9},
     _collect(), {}, "privacy-budget-refused", None),
    *[(f"q-{value}", "train", DIST, {"privacy.distributed_dp.sample_rate": value}, _collect(),
       {}, "settings-invalid", "privacy.distributed_dp.sample_rate")
      for value in (0.0, 2.0, math.nan)],
    ("t-1", "train", DIST, {"privacy.distributed_dp.threshold": 1}, _collect(), {},
     "settings-invalid", "privacy.distributed_dp.threshold"),
    ("t-10000", "train", DIST, {"privacy.distributed_dp.threshold": 10_000}, _collect(), {},
     "privacy-plan-invalid", "privacy.distributed_dp.threshold"),
    ("t-above-the-round", "train", DIST, {"privacy.distributed_dp.threshold": 4}, _collect(),
     {}, "privacy-plan-invalid", "privacy.distributed_dp.threshold"),
    ("round-threshold-below-t", "train", DIST, {"privacy.distributed_dp.threshold": 3},
     _collect(threshold=2), {}, "privacy-plan-invalid", "privacy.distributed_dp.threshold"),
    ("distributed-delta-nan", "train", DIST, {"privacy.distributed_dp.target_delta": math.nan},
     _collect(), {}, "settings-invalid", "privacy.distributed_dp.target_delta"),
    ("distributed-in-the-clear", "train", DIST, {}, None, {}, "stage-refused", None),
    # -- DP-SGD's plan -------------------------------------------------------------------
    ("delta-0.5", "train", TRAIN, {"privacy.dp_sgd.target_delta": 0.5}, None, {},
     "privacy-budget-refused", None),
    ("delta-nan", "train", TRAIN, {"privacy.dp_sgd.target_delta": math.nan}, None, {},
     "settings-invalid", "privacy.dp_sgd.target_delta"),
    ("dp-sigma-negative", "train", TRAIN, {"privacy.dp_sgd.target_epsilon": None,
                                           "privacy.dp_sgd.noise_multiplier": -1.0}, None, {},
     "settings-invalid", "privacy.dp_sgd.noise_multiplier"),
    ("planned-rounds-1e9", "train", TRAIN, {"planned_rounds": 10**9}, None, {},
     "settings-invalid", "planned_rounds"),
    ("steps-4e7", "train", TRAIN, {"planned_rounds": 100_000, "train.local_epochs": 100},
     None, {}, "privacy-budget-refused", None),
    ("no-dp-under-require-dp", "train", TRAIN, {"privacy.mechanism": "none",
                                                "privacy.dp_sgd.target_epsilon": None}, None,
     {}, "policy-refused", None),
    # -- secure-aggregation stages out of order or malformed ----------------------------
    ("unmask-before-setup", "train", TRAIN, {}, {
        m.SECAGG_STAGE: m.STAGE_UNMASK, m.SECAGG_ROUND: 1, m.SECAGG_ALIVE: [NODE, 8],
        m.SECAGG_SIGNERS: [], m.SECAGG_SIGNATURE: []}, {}, "stage-refused", None),
    ("share-keys-before-setup", "train", TRAIN, {}, {
        m.SECAGG_STAGE: m.STAGE_SHARE_KEYS, m.SECAGG_ROUND: 1, m.SECAGG_NODES: [],
        m.SECAGG_PUBLIC_KEY_1: [], m.SECAGG_PUBLIC_KEY_2: [], m.SECAGG_SIGNING_KEY: [],
        m.SECAGG_SIGNATURE: []}, {}, "stage-refused", None),
    ("collect-before-setup", "train", TRAIN, {}, {
        m.SECAGG_STAGE: m.STAGE_COLLECT, m.SECAGG_ROUND: 1, m.SECAGG_SOURCES: [],
        m.SECAGG_CIPHERTEXTS: []}, {}, "stage-refused", None),
    ("decrypt-unencrypted-round", "train", TRAIN, {}, {
        m.SECAGG_STAGE: m.STAGE_CKKS_DECRYPT, m.SECAGG_ROUND: 5, m.SECAGG_NODES: [NODE, 8],
        m.SECAGG_THRESHOLD: 2, m.SECAGG_LENGTH: 3}, {}, "stage-refused", None),
    ("unknown-stage", "train", TRAIN, {}, {m.SECAGG_STAGE: "exfiltrate", m.SECAGG_ROUND: 1},
     {}, "stage-refused", None),
    ("setup-without-threshold", "train", TRAIN, {}, {
        m.SECAGG_STAGE: m.STAGE_SETUP, m.SECAGG_ROUND: 1}, {}, "stage-refused", None),
    ("collect-without-hospitals", "train", DIST, {}, {
        m.SECAGG_STAGE: m.STAGE_CKKS_COLLECT, m.SECAGG_ROUND: 1, m.SECAGG_MAX_WEIGHT: 1.0},
     {}, "stage-refused", None),
    # -- found by attacking it: de-identification weakened, a file the server names, the
    # held-out split's seed, client-level clipping of a distributed share --------------
    ("deid-threshold-1", "train", TRAIN, {"data.deid.score_threshold": 1.0}, None,
     {"deid": "required"}, "policy-refused", "data.deid.score_threshold"),
    ("deid-spacy-model-path", "train", TRAIN, {"data.deid.spacy_model": "/etc"}, None,
     {"deid": "required"}, "policy-refused", "data.deid.spacy_model"),
    ("server-names-the-file", "train", TRAIN, {"data.path": "/etc/hosts"}, None,
     {"data-path": "", "num-partitions": 2}, "data-mapping-refused", "data.path"),
    ("held-out-split-seed", "train", TRAIN, {"data.seed": 7}, None, {},
     "data-mapping-refused", "data.seed"),
    # -- the settings themselves ---------------------------------------------------------
    ("yaml-malformed", "train", "{{{ not: yaml", None, None, {}, "settings-unreadable", None),
    ("yaml-oversized", "train", _oversized, None, None, {}, "settings-unreadable", None),
    ("yaml-not-a-mapping", "train", "- a\n- b\n", None, None, {}, "settings-unreadable",
     None),
    ("yaml-missing", "train", None, None, None, {}, "settings-unreadable", None),
    ("yaml-unknown-section", "train", TRAIN, {"exfiltrate": {"column": "text"}}, None, {},
     "settings-invalid", None),
    ("yaml-wrong-type", "train", TRAIN, {"train.batch_size": "all of them"}, None, {},
     "settings-invalid", None),
    ("preflight-yaml-malformed", "preflight", "{{{ not: yaml", None, None, {},
     "settings-unreadable", None),
]


def _settings_text(hospital, base, changes):
    if callable(base):
        return base(hospital)
    if base in (TRAIN, DIST):
        return _task(hospital, base, changes)
    return base  # raw text, or None (no task settings at all)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_server_message_is_refused_with_a_code_and_nothing_leaves(
        hospital, honest_ledger, spy, capfd, caplog, case):
    name, kind, base, changes, record, node_config, expected, key = case
    text = _settings_text(hospital, base, changes)
    run = DISTRIBUTED_RUN if base == DIST else DP_RUN
    reply = app(_message(hospital, kind, text, record), _context(hospital, run, **node_config))

    assert reply.has_error(), f"{name}: the hospital answered instead of refusing"
    refusal = parse_refusal(reply.error.reason)
    assert is_refusal_line(reply.error.reason) and refusal is not None, reply.error.reason
    assert (refusal.name, refusal.code) == (expected, reply.error.code), reply.error.reason
    if key is not None:
        assert refusal.key == key, reply.error.reason
    assert not spy.calls, f"{name}: {spy.calls} ran"
    assert (hospital["state"] / LEDGER_FILE).read_bytes() == honest_ledger
    assert len(LedgerStore(hospital["state"]).load(0, Accountant.rdp).runs) == 2
    captured = capfd.readouterr()
    assert not holds_canary(reply.error.reason, captured.out, captured.err, caplog.text)


@pytest.mark.parametrize("base,norm,record", [(DIST, 0.0, _collect()), (DIST, 1.0, _collect()),
                                              (TRAIN, math.nan, None), (TRAIN, -1.0, None)])
def test_hostile_server_client_level_clipping_is_checked(hospital, honest_ledger, spy, base,
                                                         norm, record):
    """Client-level clipping scales a distributed DP share, and its noise with it (a norm of
    0 leaves none, while the ledger books the planned noise): refused under distributed DP
    whatever the norm; a norm that is not finite and > 0 is refused everywhere."""
    run = DISTRIBUTED_RUN if base == DIST else DP_RUN
    reply = app(_message(hospital, "train", hospital[base], record,
                         extra={m.CLIPPING_NORM_KEY: norm}), _context(hospital, run))
    assert reply.error.reason.startswith("4009 privacy-plan-invalid"), reply.error.reason
    assert not spy.calls
    assert (hospital["state"] / LEDGER_FILE).read_bytes() == honest_ledger


ROUND_VALUES = [
    # id, settings changes, the round's extra config, expected key
    ("lr-factor-with-constant-schedule", {}, {m.LR_FACTOR_KEY: 0.5}, "train.lr_schedule"),
    ("lr-factor-missing", {"train.lr_schedule": "cosine"}, {}, "train.lr_schedule"),
    *[(f"lr-factor-{value!r}", {"train.lr_schedule": "cosine"}, {m.LR_FACTOR_KEY: value},
       "train.lr_schedule") for value in (5.0, 1.0001, 0.05, 0.0, -1.0, math.nan, math.inf,
                                          True, "1", 10**400)],
    ("lr-factor-below-its-floor", {"train.lr_schedule": "cosine",
                                   "train.final_lr_fraction": 0.5}, {m.LR_FACTOR_KEY: 0.4},
     "train.lr_schedule"),
    *[(f"proximal-mu-{value!r}", {}, {m.PROXIMAL_MU_KEY: value}, m.PROXIMAL_MU_KEY)
      for value in (math.nan, -1.0, math.inf, "0", 1e5, 10**400)],
]


@pytest.mark.parametrize("case", ROUND_VALUES, ids=[c[0] for c in ROUND_VALUES])
def test_hostile_server_round_values_are_refused_before_any_step(hospital, honest_ledger, spy,
                                                                 case):
    """Values sent with one round beside the task settings (the learning-rate factor of
    train.lr_schedule, FedProx's proximal term) are checked as the settings are."""
    _, changes, extra, key = case
    reply = app(_message(hospital, "train", _task(hospital, TRAIN, changes), extra=extra),
                _context(hospital, DP_RUN))
    assert reply.has_error(), "the hospital answered instead of refusing"
    refusal = parse_refusal(reply.error.reason)
    assert (refusal.name, refusal.key) == ("settings-invalid", key), reply.error.reason
    assert not spy.calls
    assert (hospital["state"] / LEDGER_FILE).read_bytes() == honest_ledger


def test_hostile_server_learns_no_label_histogram_from_refusals(hospital, honest_ledger):
    """Under DP (or a policy that requires it) an unknown-label refusal carries no count:
    probing one label at a time would give the exact label histogram."""
    for dropped in LABELS:
        text = tampered(hospital["dp"], {"data.labels": [x for x in LABELS if x != dropped]
                                         + ["zzz"]})
        for kind in ("train", "preflight"):
            reply = app(_message(hospital, kind, text), _context(hospital, DP_RUN))
            assert reply.error.reason == "4005 labels-unknown key=data.labels", reply


def test_hostile_server_note_lengths_stay_in_the_hospitals_log(hospital, honest_ledger,
                                                               capfd, caplog):
    """How many notes are longer than the windows read is a statistic of the records: it is
    written to the hospital's log, not to Flower's (the server's console in simulation)."""
    text = tampered(hospital["dp"], {"model.max_chunks": 1, "model.chunk_stride": 0})
    app(_message(hospital, "preflight", text), _context(hospital, DP_RUN))
    app(_message(hospital, "evaluate", tampered(text, {"planned_evaluations": 99})),
        _context(hospital, 555))
    captured = capfd.readouterr()
    assert "longer than" not in captured.out + captured.err + caplog.text
    assert "notes are longer than 1 windows" in (hospital["state"] / "hospital.log").read_text()


def test_hostile_server_cannot_forge_entries_in_the_hospitals_log(hospital, tmp_path):
    from fl_app.hospital.edge import write_hospital_log

    context = _context(hospital, 1, **{"state-dir": str(tmp_path)})
    write_hospital_log(context, "refused: 'x\n2026-01-01 00:00:00 ledger archived, epsilon reset'")
    lines = (tmp_path / "hospital.log").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("    2026-01-01"), lines


def test_hostile_server_details_stay_in_the_hospitals_own_log(hospital, honest_ledger):
    """What the server is not told, the hospital's operator can read: the key, the values
    the server sent and the hospital's own, in its state directory's log."""
    text = tampered(hospital["dp"], {"data.label_column": "text"})
    reply = app(_message(hospital, "train", text), _context(hospital, DP_RUN))
    assert reply.error.reason == "4003 data-mapping-refused key=data.label_column"
    local = (hospital["state"] / "hospital.log").read_text()
    assert "the server sent data.label_column='text'" in local.rsplit("refused as", 1)[-1]


def test_hostile_server_without_a_hospital_policy_leaks_no_cell_either(
        hospital, honest_ledger, tmp_path, capfd, monkeypatch):
    """A simulated hospital without a policy takes the server's mapping (as before), so the
    server can point the label column at any column: it learns how many records carry a
    label outside its set, never one of them, nor the header of a column it guessed wrong."""
    export = hospital["node_config"]["data-path"]
    context = Context(run_id=3, node_id=NODE, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 1})
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))  # its own state directory, under FLWR_HOME
    for column, expected in (("text", "4005 labels-unknown key=data.labels records=40"),
                             ("patient_name", "4005 labels-unknown key=data.labels records=40"),
                             (CANARY_COLUMN, "4005 labels-unknown key=data.labels records=40"),
                             ("zzz", "4004 data-unreadable key=data.label_column")):
        text = tampered(hospital["dp"], {"data.path": export, "data.label_column": column,
                                         "privacy.mechanism": "none",
                                         "privacy.dp_sgd.target_epsilon": None})
        reply = app(_message(hospital, "train", text), context)
        assert reply.error.reason == expected, (column, reply.error.reason)
    captured = capfd.readouterr()
    assert not holds_canary(captured.out, captured.err)
    assert CANARY in (tmp_path / "clinical-fl" / "hospital-state" / "partition-0" /
                      "hospital.log").read_text(), "the details are kept at home"


def test_hostile_server_evaluations_beyond_the_plan_are_refused(hospital, honest_ledger, spy):
    """Scores of held-out records are released without noise: a hospital answers as many
    evaluations as the server planned (or its policy allows), then refuses."""
    import json

    text = tampered(hospital["dp"], {"planned_evaluations": 2})
    context = _context(hospital, 77)
    counts = hospital["state"] / "evaluations.json"
    # Two answered (the spy refuses to score, so they fail, but each was counted first).
    for _ in range(2):
        app(_message(hospital, "evaluate", text), context)
    assert json.loads(counts.read_text())["77"] == 2
    reply = app(_message(hospital, "evaluate", text), context)
    assert reply.error.reason == "4010 evaluations-exhausted key=max-evaluations evaluations=2"
    assert spy.calls == ["evaluate", "evaluate"], "the third was never scored"
    # The policy's bound is lower still: one evaluation in run 78, then refusals.
    lower = _context(hospital, 78, **{"max-evaluations": 1})
    app(_message(hospital, "evaluate", text), lower)
    reply = app(_message(hospital, "evaluate", text), lower)
    assert reply.error.reason == "4010 evaluations-exhausted key=max-evaluations evaluations=1"


def test_hostile_server_two_runs_at_once_keep_both_runs_in_the_ledger(hospital, honest_ledger,
                                                                     tmp_path):
    """Two runs served at the same time by one hospital: the second waits for the first to
    save its ledger (a lock on the state directory), so neither run's spending is lost."""
    import threading

    from fl_app.hospital.state import state_locked

    state = {"state-dir": str(tmp_path / "state")}
    first, second = _context(hospital, 901, **state), _context(hospital, 902, **state)
    replies = {}
    with state_locked(first):
        thread = threading.Thread(target=lambda: replies.setdefault(
            901, app(_message(hospital, "train", hospital["dp"]), first)))
        thread.start()
        thread.join(timeout=3)
        assert thread.is_alive(), "training waits for the ledger's lock"
    thread.join(timeout=120)
    replies[902] = app(_message(hospital, "train", hospital["dp"]), second)
    assert not any(r.has_error() for r in replies.values())
    runs = LedgerStore(tmp_path / "state").load(0, Accountant.rdp).runs
    assert set(runs) == {901, 902} and all(run.steps > 0 for run in runs.values())


def test_hostile_server_proximal_term_for_a_dp_sgd_hospital_is_refused(hospital, honest_ledger,
                                                                       spy):
    """FedProx's term is outside the DP-SGD analysis: refused, naming the round's key."""
    reply = app(_message(hospital, "train", hospital[TRAIN], extra={m.PROXIMAL_MU_KEY: 0.1}),
                _context(hospital, DP_RUN))
    refusal = parse_refusal(reply.error.reason)
    assert (refusal.name, refusal.key) == ("privacy-budget-refused", m.PROXIMAL_MU_KEY), \
        reply.error.reason
    assert not spy.calls
    assert (hospital["state"] / LEDGER_FILE).read_bytes() == honest_ledger


def test_hostile_server_proximal_term_with_distributed_dp_is_refused(hospital, honest_ledger,
                                                                     spy):
    """Distributed DP takes no local steps: a proximal term there would be ignored, so it is
    refused like any setting of a mechanism that is off."""
    reply = app(_message(hospital, "train", hospital[DIST], _collect(),
                         extra={m.PROXIMAL_MU_KEY: 0.1}), _context(hospital, DISTRIBUTED_RUN))
    refusal = parse_refusal(reply.error.reason)
    assert (refusal.name, refusal.key) == ("settings-invalid", m.PROXIMAL_MU_KEY), \
        reply.error.reason
    assert not spy.calls
    assert (hospital["state"] / LEDGER_FILE).read_bytes() == honest_ledger
