"""A mistaken or malicious server against record-level privacy's one switch,
``privacy.mechanism`` (none | dp_sgd | distributed_dp, issue 32), and the hospital's dispatch on
it (``tasks/privacy/mechanisms/``), through one hospital's real ClientApp (its edge, its
secure-aggregation and clipping mods, its handlers) with real task YAML and a real ledger in a
temporary state directory.

Two hospitals hold the same export: ``policy`` (require-dp, max-epsilon 3) and ``open`` (its own
data mapping, no DP requirement: the server chooses). What must hold, as it did with the two
flags of before (``privacy.dp_sgd.enabled``, ``privacy.distributed_dp.enabled``):

- an odd spelling or type of the switch is refused (``settings-invalid``), never read as
  another mechanism;
- a hospital whose policy requires DP refuses every way of asking for none (the word, a sweep's
  non-private level, the key left out) at preflight and at train, and evaluates with its
  aggregate release;
- a mechanism's values sent with another mechanism are refused; nothing is trained, released or
  booked for a refused message, and the ledger stays byte for byte as it was;
- switching mechanism between preflight and train in one run books every release and step;
- evaluation withholds the per-class counts exactly where the old rule withheld them;
- client-level DP's clipping (``fl_app/hospital/clipping_mod.py``) is applied to an honest
  update and refused for a distributed DP share, whichever spelling the server uses.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clinical_fl.protocol import messages as m
from clinical_fl.protocol.refusals import is_refusal_line, parse_refusal
from clinical_fl.secure_aggregation import ckks
from clinical_fl.settings.compose import task_settings_from_yaml, task_settings_to_yaml
from clinical_fl.settings.privacy import Accountant, RecordLevelMechanism
from fl_app.hospital.client_app import app
from tasks.privacy.ledger import LEDGER_FILE, LedgerStore
from tasks.privacy.mechanisms import MECHANISMS, record_level_privacy
from tasks.privacy.mechanisms.distributed_dp import DistributedDp
from tasks.privacy.mechanisms.dp_sgd import DpSgd
from tasks.privacy.mechanisms.no_dp import NoRecordLevelDp
from tests.hospital_process import initial_arrays
from tests.hostile_server import (
    LABELS,
    holds_canary,
    spy_on_steps,
    tampered,
    task_identity,
    write_canary_export,
)
from tests.secure_hospitals import provision_signing_keys
from tests.support import task

NODE, OTHERS = 7, [8, 9]
RUN = 41  # the Flower run of the honest ledger
POLICY = {"max-epsilon": 3.0, "require-dp": True}


# -- the hospital ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def identity():
    with task_identity(RUN, NODE):
        yield


@pytest.fixture(scope="module")
def hospital(tiny_bert, tmp_path_factory, identity):
    """The export, the CKKS key, both hospitals' node configs (without a state-dir: each test
    gives its own) and the honest task settings of each mechanism."""
    root = tmp_path_factory.mktemp("mechanism")
    export = write_canary_export(root / "export" / "notes.csv", hospital=0)
    secret = ckks.simulation_secret_context(root / "ckks")
    mapping = {"partition-id": 0, "data-path": str(export), "text-column": "text",
               "label-column": "label", "deid": "allowed", "ckks-context": str(secret)}
    provision_signing_keys([Context(run_id=0, node_id=NODE, node_config=mapping,
                                    state=RecordDict(), run_config={})], root / "signing")
    files = ("data=files", f"data.labels=[{','.join(LABELS)}]", "train.batch_size=8",
             "train.local_epochs=1")
    dp = task(tiny_bert, *files, "privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=2",
              labels=LABELS, planned_rounds=2)
    release = task(tiny_bert, *files, "privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=2",
                   "privacy.dp_sgd.label_count_noise=4", labels=LABELS, planned_rounds=2)
    none = task(tiny_bert, *files, labels=LABELS, planned_rounds=2)
    distributed = task(tiny_bert, *files, "privacy=distributed_dp", "secure_aggregation=ckks",
                       "privacy.distributed_dp.target_epsilon=null",
                       "privacy.distributed_dp.noise_multiplier=5.0", labels=LABELS,
                       planned_rounds=4)
    distributed.privacy.distributed_dp = replace(
        distributed.privacy.distributed_dp, sample_rate=0.2, threshold=2, target_delta=1e-5)
    texts = {name: task_settings_to_yaml(settings) for name, settings in (
        ("dp", dp), ("release", release), ("none", none), ("distributed", distributed))}
    return {"root": root, "policy": {**mapping, **POLICY}, "open": mapping, **texts,
            "arrays": initial_arrays(texts["dp"])}


@pytest.fixture(scope="module")
def honest_ledger(hospital):
    """One honest DP-SGD round of the policy hospital: the ledger every refused message must
    leave byte for byte as it is (each test starts from a copy)."""
    state = hospital["root"] / "honest"
    reply = _send(hospital, "train", hospital["dp"], state, "policy")
    assert not reply.has_error(), reply.error.reason
    return (state / LEDGER_FILE).read_bytes()


@pytest.fixture
def state(hospital, honest_ledger, tmp_path):
    """A state directory holding the honest ledger."""
    target = tmp_path / "state"
    target.mkdir()
    (target / LEDGER_FILE).write_bytes(honest_ledger)
    return target


def _context(hospital, state: Path, who: str, run: int = RUN) -> Context:
    return Context(run_id=run, node_id=NODE, state=RecordDict(), run_config={},
                   node_config={**hospital[who], "state-dir": str(state)})


def _collect(threshold=2):
    """A CKKS collect stage, as the server states it."""
    return {m.SECAGG_STAGE: m.STAGE_CKKS_COLLECT, m.SECAGG_ROUND: 1,
            m.SECAGG_THRESHOLD: threshold, m.SECAGG_NODES: [NODE, *OTHERS],
            m.SECAGG_MAX_WEIGHT: 1.0}


def _message(hospital, kind: str, text: str, record=None, extra=None) -> Message:
    parts = {m.CONFIG_RECORD: ConfigRecord({m.TASK_KEY: text, m.SERVER_ROUND_KEY: 1,
                                            **(extra or {})})}
    if kind in ("train", "evaluate"):
        parts[m.ARRAYS_RECORD] = hospital["arrays"]
    if record is not None:
        parts[m.SECAGG_RECORD] = ConfigRecord(record)
    message_type = {"preflight": f"query.{m.PREFLIGHT_QUERY}"}.get(kind, kind)
    return Message(RecordDict(parts), dst_node_id=NODE, message_type=message_type)


def _send(hospital, kind, text, state, who, run=RUN, record=None, extra=None) -> Message:
    return app(_message(hospital, kind, text, record, extra), _context(hospital, state, who, run))


def _refusal(reply: Message) -> tuple[str, str | None]:
    """(name, key) of an error reply or of a declined preflight; ('', None) for neither."""
    if reply.has_error():
        line = reply.error.reason
    elif m.PREFLIGHT_STATUS_RECORD in reply.content.config_records:
        status = reply.content[m.PREFLIGHT_STATUS_RECORD]
        line = status[m.PREFLIGHT_PROBLEM] or status[m.PREFLIGHT_DECLINED]
    else:
        line = ""
    if not line:
        return "", None
    assert is_refusal_line(line), f"not a refusal line: {line!r}"
    refusal = parse_refusal(line)
    return refusal.name, refusal.key


def _counts(reply: Message) -> list[int] | None:
    """The label counts a preflight reply carries (None: none)."""
    if reply.has_error() or m.PREFLIGHT_COUNTS_RECORD not in reply.content.metric_records:
        return None
    counts = reply.content[m.PREFLIGHT_COUNTS_RECORD]
    return [int(c) for c in counts[m.LABEL_COUNTS]] if m.LABEL_COUNTS in counts else None


def _history(state: Path, run: int = RUN) -> list:
    lifetime = LedgerStore(state).load(0, Accountant.rdp)
    return [list(step) for step in lifetime.runs[run].history] if run in lifetime.runs else []


@pytest.fixture
def spy(monkeypatch):
    return spy_on_steps(monkeypatch)


def _assert_refused_and_nothing_left(reply, state, before, spy, expected, key, capfd):
    name, got_key = _refusal(reply)
    assert name == expected, (name, got_key, reply.error.reason if reply.has_error() else "")
    if key is not None:
        assert got_key == key, got_key
    assert _counts(reply) is None, "counts left with a refusal"
    assert not spy.calls, f"{spy.calls} ran"
    assert (state / LEDGER_FILE).read_bytes() == before, "the ledger changed"
    captured = capfd.readouterr()
    if reply.has_error():
        assert not holds_canary(reply.error.reason, captured.out, captured.err)


# -- the dispatch itself ---------------------------------------------------------------------

def test_every_mechanism_has_one_implementation_with_the_old_flags_meaning(hospital):
    """The table the hospital dispatches on: one class per value of the switch; only none is
    non-private, only distributed DP sends a share, only DP-SGD plans at preflight (as the
    old handlers' ``if dp.enabled`` / ``if distributed``)."""
    assert set(MECHANISMS) == set(RecordLevelMechanism)
    settings = {name: task_settings_from_yaml(hospital[name]).privacy
                for name in ("none", "dp", "distributed")}
    kinds = {name: type(record_level_privacy(p)) for name, p in settings.items()}
    assert kinds == {"none": NoRecordLevelDp, "dp": DpSgd, "distributed": DistributedDp}
    table = {name: (cls.private, cls.sends_share, cls.plans_at_preflight)
             for name, cls in kinds.items()}
    assert table == {"none": (False, False, False), "dp": (True, False, True),
                     "distributed": (True, True, False)}
    for name, privacy in settings.items():  # record_level is what the old two flags said
        assert privacy.record_level == (name != "none")


# -- the switch spelled otherwise --------------------------------------------------------------

ODD_SPELLINGS = ["DP_SGD", "Dp_Sgd", " dp_sgd", "dp-sgd", "dpsgd", "NONE", "None", "null",
                 "", "Distributed_DP", 1, 0, 2, 1.0, True, False, None, [], ["dp_sgd"],
                 {"dp_sgd": True}, "dp_sgd,distributed_dp", "RecordLevelMechanism.DP_SGD",
                 "RecordLevelMechanism"]


@pytest.mark.parametrize("kind", ["preflight", "train"])
@pytest.mark.parametrize("value", ODD_SPELLINGS, ids=[repr(v) for v in ODD_SPELLINGS])
@pytest.mark.parametrize("who", ["policy", "open"])
def test_an_odd_spelling_of_the_switch_is_refused_never_read_as_another_mechanism(
        hospital, state, spy, capfd, kind, value, who):
    """Whatever the base settings (DP-SGD on, or the defaults of none), a value that is not
    exactly one of the enum's is ``settings-invalid`` naming ``privacy.mechanism``: never
    taken as none (no DP), nor as a mechanism its values were not checked for."""
    before = (state / LEDGER_FILE).read_bytes()
    for base in ("dp", "none"):
        text = tampered(hospital[base], {"privacy.mechanism": value})
        reply = _send(hospital, kind, text, state, who)
        _assert_refused_and_nothing_left(reply, state, before, spy, "settings-invalid",
                                         "privacy.mechanism", capfd)


def test_the_enum_name_spelling_is_the_same_mechanism(hospital):
    """OmegaConf also takes ``RecordLevelMechanism.<name>``: it must mean exactly <name> (an
    equivalent spelling any raw-YAML reader of the switch has to treat alike)."""
    for name in RecordLevelMechanism:
        base = {"none": "none", "dp_sgd": "dp", "distributed_dp": "distributed"}[name.value]
        text = tampered(hospital[base], {"privacy.mechanism": f"RecordLevelMechanism.{name.value}"})
        assert task_settings_from_yaml(text) == task_settings_from_yaml(hospital[base])


# -- asking a DP hospital for no DP, every way -------------------------------------------------

def _without_mechanism_key(text: str) -> str:
    tree = yaml.safe_load(text)
    del tree["privacy"]["mechanism"]
    return yaml.safe_dump(tree, sort_keys=False)


def _without_privacy(text: str) -> str:
    tree = yaml.safe_load(text)
    del tree["privacy"]
    return yaml.safe_dump(tree, sort_keys=False)


DOWNGRADES = {
    "mechanism-none": lambda h: h["none"],
    "enum-name-none": lambda h: tampered(h["none"], {
        "privacy.mechanism": "RecordLevelMechanism.none"}),
    "dp-sgd-target-inf": lambda h: tampered(h["dp"], {"privacy.dp_sgd.target_epsilon": math.inf}),
    "dp-sgd-target-inf-with-release": lambda h: tampered(h["release"], {
        "privacy.dp_sgd.target_epsilon": math.inf}),
    "distributed-target-inf": lambda h: tampered(h["distributed"], {
        "privacy.distributed_dp.target_epsilon": math.inf,
        "privacy.distributed_dp.noise_multiplier": None}),
    "mechanism-key-left-out": lambda h: _without_mechanism_key(h["none"]),
    "privacy-section-left-out": lambda h: _without_privacy(h["none"]),
}


@pytest.mark.parametrize("name", list(DOWNGRADES))
def test_a_dp_hospital_refuses_every_way_of_asking_for_no_dp(hospital, state, spy, capfd,
                                                             name):
    text = DOWNGRADES[name](hospital)
    assert task_settings_from_yaml(text).privacy.mechanism == RecordLevelMechanism.none
    before = (state / LEDGER_FILE).read_bytes()
    reply = _send(hospital, "preflight", text, state, "policy")
    assert not reply.has_error(), "declined, not a problem that stops the run"
    _assert_refused_and_nothing_left(reply, state, before, spy, "policy-refused", "require-dp",
                                     capfd)
    # The server trains it anyway, in a round with a clipping norm too (refused by the
    # policy, or before it by the clipping mod).
    for extra in (None, {m.CLIPPING_NORM_KEY: 1.0}):
        reply = _send(hospital, "train", text, state, "policy", extra=extra)
        name = _refusal(reply)[0]
        assert name == "policy-refused" or extra and name == "privacy-plan-invalid", name
        _assert_refused_and_nothing_left(reply, state, before, spy, name, None, capfd)


# -- one mechanism's values with another ---------------------------------------------------------

OUT_OF_PLACE = [
    # DP-SGD with distributed DP's plan (what the server completes for distributed DP only)
    ("dp", {"privacy.distributed_dp.sample_rate": 0.5}, "privacy.distributed_dp.sample_rate"),
    ("dp", {"privacy.distributed_dp.threshold": 2}, "privacy.distributed_dp.threshold"),
    ("dp", {"privacy.distributed_dp.noise_multiplier": 5.0},
     "privacy.distributed_dp.noise_multiplier"),
    ("dp", {"privacy.distributed_dp.target_delta": 1e-5}, "privacy.distributed_dp.target_delta"),
    ("dp", {"privacy.distributed_dp.max_epsilon": 100.0}, "privacy.distributed_dp.max_epsilon"),
    ("dp", {"privacy.distributed_dp.accountant": "prv"}, "privacy.distributed_dp.accountant"),
    ("dp", {"privacy.distributed_dp.target_epsilon": 50.0},
     "privacy.distributed_dp.target_epsilon"),
    # distributed DP with DP-SGD's values
    ("distributed", {"privacy.dp_sgd.label_count_noise": 1e-3},
     "privacy.dp_sgd.label_count_noise"),
    ("distributed", {"privacy.dp_sgd.noise_multiplier": 1e-3}, "privacy.dp_sgd.noise_multiplier"),
    ("distributed", {"privacy.dp_sgd.max_epsilon": 100.0}, "privacy.dp_sgd.max_epsilon"),
    ("distributed", {"privacy.dp_sgd.accountant": "prv"}, "privacy.dp_sgd.accountant"),
    ("distributed", {"privacy.dp_sgd.target_delta": 0.1}, "privacy.dp_sgd.target_delta"),
    # none with either mechanism's values (they would be silently ignored)
    ("none", {"privacy.dp_sgd.target_epsilon": 2.0}, "privacy.dp_sgd.target_epsilon"),
    ("none", {"privacy.dp_sgd.label_count_noise": 4.0}, "privacy.dp_sgd.label_count_noise"),
    ("none", {"privacy.distributed_dp.threshold": 2}, "privacy.distributed_dp.threshold"),
    # DP-SGD's own plan, broken
    ("dp", {"privacy.dp_sgd.target_epsilon": None}, "privacy.dp_sgd"),
    ("dp", {"privacy.dp_sgd.noise_multiplier": 1.0}, "privacy.dp_sgd"),
    *[("dp", {"privacy.dp_sgd.target_epsilon": None, "privacy.dp_sgd.noise_multiplier": v},
       "privacy.dp_sgd.noise_multiplier") for v in (0.0, -1.0, math.nan, math.inf)],
    *[("dp", {"privacy.dp_sgd.target_epsilon": v}, "privacy.dp_sgd.target_epsilon")
      for v in (0.0, -1.0, math.nan, -math.inf)],
    # distributed DP's own plan, broken
    ("distributed", {"privacy.distributed_dp.noise_multiplier": None,
                     "privacy.distributed_dp.target_epsilon": None},
     "privacy.distributed_dp.target_epsilon"),
    ("distributed", {"privacy.distributed_dp.noise_multiplier": 0.0},
     "privacy.distributed_dp.noise_multiplier"),
    # distributed DP's settings that only its own checks catch
    ("distributed", {"train.lr_schedule": "cosine"}, "train.lr_schedule"),
    ("distributed", {"train.class_weights": [1.0] * len(LABELS)}, "train.class_weights"),
]


@pytest.mark.parametrize("kind", ["preflight", "train"])
@pytest.mark.parametrize("case", OUT_OF_PLACE,
                         ids=[f"{c[0]}-{'+'.join(f'{k}={v}' for k, v in c[1].items())}"
                              for c in OUT_OF_PLACE])
def test_values_that_belong_to_another_mechanism_are_refused(hospital, state, spy, capfd,
                                                             kind, case):
    base, changes, key = case
    text = tampered(hospital[base], changes)
    before = (state / LEDGER_FILE).read_bytes()
    record = _collect() if base == "distributed" and kind == "train" else None
    for who in ("policy", "open"):
        reply = _send(hospital, kind, text, state, who, record=record)
        _assert_refused_and_nothing_left(reply, state, before, spy, "settings-invalid", key,
                                         capfd)


@pytest.mark.parametrize("record,expected", [
    (None, "stage-refused"),  # in the clear: no secure aggregation at all
    (_collect(threshold=1), "privacy-plan-invalid"),  # sums of one hospital
])
def test_distributed_dp_without_secure_aggregation_sends_nothing(hospital, state, spy, capfd,
                                                                 record, expected):
    before = (state / LEDGER_FILE).read_bytes()
    for who in ("policy", "open"):
        reply = _send(hospital, "train", hospital["distributed"], state, who, record=record)
        name, _ = _refusal(reply)
        assert name in (expected, "stage-refused"), reply.error.reason
        _assert_refused_and_nothing_left(reply, state, before, spy, name, None, capfd)


# -- preflight and train disagreeing within one run ------------------------------------------

def test_switching_mechanism_after_a_release_books_every_release_and_step(hospital, tmp_path):
    """Preflight under DP-SGD releases noisy counts (booked); the server then asks the same run
    for none (refused: no counts, no update), for the stored counts again under each mechanism
    (never a second draw, never exact counts), and trains under distributed DP: the step is
    booked after the release, in the one entry of the run."""
    state = tmp_path / "state"
    run = 51
    reply = _send(hospital, "preflight", hospital["release"], state, "policy", run)
    released = _counts(reply)
    assert _refusal(reply) == ("", None) and released is not None
    booked = (state / LEDGER_FILE).read_bytes()
    assert _history(state, run) == [[4.0, 1.0, 1]]

    for text in (hospital["none"], DOWNGRADES["dp-sgd-target-inf-with-release"](hospital)):
        for kind in ("preflight", "train"):
            reply = _send(hospital, kind, text, state, "policy", run)
            assert _refusal(reply)[0] == "policy-refused" and _counts(reply) is None
            assert (state / LEDGER_FILE).read_bytes() == booked
    # Distributed DP at preflight: counts withheld, nothing drawn.
    reply = _send(hospital, "preflight", hospital["distributed"], state, "policy", run)
    assert _refusal(reply) == ("", None) and _counts(reply) is None
    # DP-SGD again, with a far smaller sigma: the stored counts, nothing new.
    text = tampered(hospital["release"], {"privacy.dp_sgd.label_count_noise": 1e-9})
    reply = _send(hospital, "preflight", text, state, "policy", run)
    assert _counts(reply) == released
    assert (state / LEDGER_FILE).read_bytes() == booked

    reply = _send(hospital, "train", hospital["distributed"], state, "policy", run,
                  record=_collect())
    assert not reply.has_error(), reply.error.reason
    history = _history(state, run)
    assert history[0] == [4.0, 1.0, 1] and len(history) == 2, history
    lifetime = reply.content[m.METRICS_RECORD][m.LIFETIME_EPSILON]
    assert 0 < lifetime <= POLICY["max-epsilon"]


def test_a_release_is_not_drawn_after_a_distributed_step_of_the_same_run(hospital, tmp_path):
    """Train under distributed DP first, then ask the run's preflight for DP-SGD counts at a
    tiny sigma: the run has spent, so the release (planned only before the first step) is
    refused and nothing leaves."""
    state = tmp_path / "state"
    run = 52
    reply = _send(hospital, "train", hospital["distributed"], state, "policy", run,
                  record=_collect())
    assert not reply.has_error(), reply.error.reason
    before = (state / LEDGER_FILE).read_bytes()
    text = tampered(hospital["release"], {"privacy.dp_sgd.label_count_noise": 1e-3})
    for who in ("policy", "open"):
        reply = _send(hospital, "preflight", text, state, who, run)
        assert _counts(reply) is None and _refusal(reply)[0], _refusal(reply)
        assert (state / LEDGER_FILE).read_bytes() == before


def test_a_hospital_without_require_dp_keeps_what_a_run_booked_when_it_turns_to_none(
        hospital, tmp_path):
    """Without require-dp the server may choose none, also in a run that started under DP-SGD
    (as with the old flags). What the run booked stays booked, byte for byte: nothing a later
    non-private round does rewrites or drops it."""
    state = tmp_path / "state"
    run = 53
    reply = _send(hospital, "preflight", hospital["release"], state, "open", run)
    assert _counts(reply) is not None
    booked = (state / LEDGER_FILE).read_bytes()
    reply = _send(hospital, "train", hospital["none"], state, "open", run)
    assert not reply.has_error(), reply.error.reason
    assert (state / LEDGER_FILE).read_bytes() == booked


# -- evaluation ------------------------------------------------------------------------------

def _old_rule_private(text: str) -> bool:
    """What the old hospital called private (``Hospital.is_private`` of bdfa84c): either flag
    on, and not a sweep's non-private level. Written against the YAML the server sent."""
    privacy = yaml.safe_load(text).get("privacy") or {}
    name = privacy.get("mechanism", "none")
    section = privacy.get(name) or {}
    level_without_dp = (section.get("target_epsilon") == math.inf
                        and section.get("noise_multiplier") is None)
    return name in ("dp_sgd", "distributed_dp") and not level_without_dp


EVALUATED = {"none": lambda h: h["none"], "dp_sgd": lambda h: h["dp"],
             "distributed_dp": lambda h: h["distributed"],
             "dp-sgd-target-inf": DOWNGRADES["dp-sgd-target-inf"],
             "distributed-target-inf": DOWNGRADES["distributed-target-inf"]}


@pytest.mark.parametrize("who", ["policy", "open"])
@pytest.mark.parametrize("name", list(EVALUATED))
def test_evaluation_withholds_per_class_counts_exactly_where_it_did(hospital, tmp_path, who,
                                                                    name):
    """Per-class counts add up to the held-out label histogram: released only with the
    ``full`` release, which is the default only without DP and without require-dp."""
    text = EVALUATED[name](hospital)
    reply = _send(hospital, "evaluate", text, tmp_path / "state", who, run=300)
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content[m.METRICS_RECORD]
    withheld = _old_rule_private(text) or who == "policy"
    assert (list(metrics[m.TRUE_POSITIVES]) == []) == withheld, (name, who)
    assert not math.isnan(metrics[m.ACCURACY])  # aggregate scores leave either way


# -- client-level DP's clipping ------------------------------------------------------------------

def _flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel()
                           for a in arrays.to_numpy_ndarrays()])


@pytest.mark.parametrize("base,who", [("dp", "policy"), ("none", "open")])
def test_an_honest_round_with_client_level_dp_is_clipped_not_refused(hospital, tmp_path,
                                                                      base, who):
    """``privacy=dp_sgd_central_dp`` and ``privacy=central_dp``: the server's strategy sends a
    clipping norm with every round; the hospital clips its update to it (docs/privacy.md:
    "refused under distributed DP" only). The clipping mod decides "distributed" by reading
    ``privacy.distributed_dp.enabled`` from the raw YAML, a key the single switch removed:
    the KeyError makes it treat every message as distributed DP, so every honest round of
    client-level DP is refused and no run with central DP can train."""
    norm = 1e-3
    reply = _send(hospital, "train", hospital[base], tmp_path / "state", who,
                  extra={m.CLIPPING_NORM_KEY: norm})
    assert not reply.has_error(), reply.error.reason
    update = _flat(reply.content.array_records[m.ARRAYS_RECORD]) - _flat(hospital["arrays"])
    assert np.linalg.norm(update) <= norm * (1 + 1e-4)


DISTRIBUTED_SPELLINGS = {
    "plain": lambda t: t,
    "enum-name": lambda t: tampered(
        t, {"privacy.mechanism": "RecordLevelMechanism.distributed_dp"}),
    "explicit-tag": lambda t: t.replace("mechanism: distributed_dp",
                                        "mechanism: !!str distributed_dp"),
    "flow-mapping-key": lambda t: t.replace("mechanism: distributed_dp",
                                            "? mechanism\n  : distributed_dp"),
    # a key the schema no longer has, saying "off" (the handler refuses the settings, but a
    # mod reading the raw YAML must not clip first)
    "stale-enabled-false": lambda t: t.replace("  distributed_dp:\n",
                                               "  distributed_dp:\n    enabled: false\n", 1),
    # a duplicate key: PyYAML keeps the last, OmegaConf refuses the text
    "duplicate-key": lambda t: t.replace("mechanism: distributed_dp",
                                         "mechanism: distributed_dp\n  mechanism: none"),
}


@pytest.mark.parametrize("spelling", list(DISTRIBUTED_SPELLINGS))
def test_clipping_a_distributed_share_is_refused_however_the_switch_is_written(
        hospital, state, spy, capfd, spelling):
    """A clipped share scales its noise with it, while every ledger books the planned noise: a
    distributed DP round with a clipping norm is refused before any step, for every way of
    writing the switch that the hospital's own parser reads as distributed DP (a fix of the
    clipping mod must read the switch as the handler does)."""
    text = DISTRIBUTED_SPELLINGS[spelling](hospital["distributed"])
    assert (text == hospital["distributed"]) == (spelling == "plain")
    if spelling not in ("stale-enabled-false", "duplicate-key"):
        assert (task_settings_from_yaml(text).privacy.mechanism
                == RecordLevelMechanism.distributed_dp)
    before = (state / LEDGER_FILE).read_bytes()
    for who in ("policy", "open"):
        reply = _send(hospital, "train", text, state, who, record=_collect(),
                      extra={m.CLIPPING_NORM_KEY: 1.0})
        assert reply.has_error(), f"{spelling}: a clipped distributed share left"
        _assert_refused_and_nothing_left(reply, state, before, spy, _refusal(reply)[0], None,
                                         capfd)


def test_the_honest_ledger_is_a_dp_sgd_round(honest_ledger, hospital):
    """The fixture's ledger is what the refused messages are compared with: one run, one
    round of DP-SGD steps at the calibrated noise."""
    state = hospital["root"] / "honest"
    runs = LedgerStore(state).load(0, Accountant.rdp).runs
    assert list(runs) == [RUN] and runs[RUN].rounds_trained == [1]
    assert all(step[0] > 0 for step in runs[RUN].history)
