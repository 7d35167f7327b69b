"""Secure aggregation in process: the server's Grid and the hospitals' real mod, under the
real FedAvg. What reaches the server is not any hospital's update, and the aggregate is
FedAvg's within the quantisation (SecAgg+) or CKKS tolerance."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
)

from clinical_fl.protocol import messages as m
from clinical_fl.secure_aggregation import ckks
from clinical_fl.settings.checks import ConfigError
from clinical_fl.settings.compose import compose_config, task_settings_to_yaml, to_run_settings
from clinical_fl.settings.secure_aggregation import SecureAggregationMode, SecureAggregationSettings
from fl_app.exchange import ciphertext_record
from fl_app.hospital.secure_aggregation_mod import ckks_context_path
from fl_app.server.grids.secure_aggregation import SecureAggregationGrid, ciphertexts_of
from fl_app.server.preflight import HospitalReport
from fl_app.server.server_app import Federation, check_ckks_keys, secure_aggregation_grid
from tests.hospital_process import hospital_preflight
from tests.secure_hospitals import (
    ADAPTER,
    HospitalsGrid,
    fedavg_of,
    hospital_log,
    records_of,
    step_of,
    through_hospital,
)
from tests.support import task

NODES = [101, 202, 303, 404]


@pytest.fixture(autouse=True)
def _process_identity():
    """Flower stamps messages with the run and node of the process; tests play one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


@pytest.fixture
def ckks_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    return tmp_path


def _round(hospitals, settings, strategy=None, public=None):
    strategy = strategy or FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2,
                                  min_train_nodes=2)
    grid = SecureAggregationGrid(hospitals, settings, max(records_of(n) for n in NODES),
                                 public)
    start = ArrayRecord({k: Array(v + 0.5) for k, v in ADAPTER.items()})
    messages = strategy.configure_train(1, start, ConfigRecord({"x": 1}), grid)
    replies = list(grid.send_and_receive(messages))
    arrays, _ = strategy.aggregate_train(1, replies)
    return grid, replies, start, arrays


def _assert_fedavg(arrays, nodes, start, tolerance):
    expected = fedavg_of(nodes, {k: a.numpy() for k, a in start.items()})
    for name, value in arrays.items():
        assert np.abs(value.numpy() - expected[name]).max() < tolerance, name


def _public_of(hospitals):
    context = hospitals.contexts[NODES[0]]
    return ckks.public_bytes(ckks.load_secret_context(ckks_context_path(context), "test"))


def test_secagg_plus_gives_fedavg_and_the_server_never_sees_an_update():
    hospitals = HospitalsGrid(NODES)
    settings = SecureAggregationSettings(mode="secagg_plus")
    grid, replies, start, arrays = _round(hospitals, settings)
    _assert_fedavg(arrays, NODES, start, 1e-5)
    for reply in replies:  # what the strategy gets: each hospital's metrics, the protocol's table
        assert set(reply.content[m.METRICS_RECORD]) <= set(m.metric_table("train"))
        assert reply.content[m.METRICS_RECORD][m.SECAGG_SECONDS] > 0
    uploads = [(node, content) for node, content in hospitals.received
               if content is not None and isinstance(content.get(m.SECAGG_RECORD), ArrayRecord)]
    assert len(uploads) == len(NODES)
    for node, content in uploads:
        masked = content[m.SECAGG_RECORD][m.SECAGG_VECTOR].numpy()[:-1].astype(float)
        step = np.concatenate([s.ravel() for s in step_of(node).values()])
        # Masked values are uniform over 2^32: nothing of the update shows.
        assert abs(np.corrcoef(masked, step)[0, 1]) < 0.1
        assert masked.std() > 2**30
        assert m.ARRAYS_RECORD not in content
    stats = grid.take_round_stats()
    assert stats["secure_aggregation/stage_bytes"] > 0
    assert stats["secure_aggregation/update_bytes"] > 0


@pytest.mark.parametrize("nodes,refusing,summed", [
    # Threshold 3 of 4: 404 drops after key sharing; its pairwise masks are rebuilt.
    (NODES, [], [101, 202, 303]),
    # Threshold 3 of 5: 404 drops after key sharing and 303 refuses to train (its budget);
    # the refusal keeps its code.
    ([*NODES, 505], [303], [101, 202, 505]),
])
def test_secagg_plus_survives_hospitals_lost_after_sharing_keys(nodes, refusing, summed):
    hospitals = HospitalsGrid(nodes, silent={404: m.STAGE_COLLECT}, refusing=refusing)
    settings = SecureAggregationSettings(mode="secagg_plus")
    _, replies, start, arrays = _round(hospitals, settings)
    _assert_fedavg(arrays, summed, start, 1e-5)
    codes = [r.error.code for r in replies if r.has_error()]
    assert codes == [m.PRIVACY_BUDGET_REFUSED] * len(refusing)


def test_secagg_plus_releases_nothing_when_fewer_than_the_threshold_are_alive():
    # Threshold 3 of 4: 404 lost after key sharing and 303 refusing leave two updates.
    hospitals = HospitalsGrid(NODES, silent={404: m.STAGE_COLLECT}, refusing=[303])
    settings = SecureAggregationSettings(mode="secagg_plus")
    _, replies, _, arrays = _round(hospitals, settings)
    assert arrays is None
    reasons = {r.metadata.src_node_id: (r.error.code, r.error.reason) for r in replies}
    # Its refusal, kept as it was sent.
    assert reasons[303] == (m.PRIVACY_BUDGET_REFUSED, "4031 privacy-budget-refused")
    assert "updates received: 2 hospital(s), fewer than the reconstruction threshold 3" \
        in reasons[101][1]
    # No hospital was asked for a share: nothing but the masked updates reached the server.
    stages = [c[m.SECAGG_RECORD] for _, c in hospitals.received if c and m.SECAGG_RECORD in c]
    assert not any(m.SECAGG_SHARE_VALUES in record for record in stages)


def test_secagg_plus_releases_nothing_when_a_hospital_is_lost_after_its_update():
    # 404 sent its masked update and was lost before signing the round's view: every
    # hospital unmasks only a view all alive hospitals signed, so the round is lost (its
    # masked update cannot be told apart from a lie about who is alive).
    hospitals = HospitalsGrid(NODES, silent={404: m.STAGE_CONSISTENCY})
    _, replies, _, arrays = _round(hospitals, SecureAggregationSettings(mode="secagg_plus"))
    assert arrays is None
    assert "views signed: 3 of the 4 hospitals" in replies[0].error.reason
    stages = [c[m.SECAGG_RECORD] for _, c in hospitals.received if c and m.SECAGG_RECORD in c]
    assert not any(m.SECAGG_SHARE_VALUES in record for record in stages)


def test_a_round_below_the_threshold_releases_nothing():
    hospitals = HospitalsGrid(NODES, silent={303: m.STAGE_COLLECT, 404: m.STAGE_COLLECT})
    settings = SecureAggregationSettings(mode="secagg_plus", reconstruction_threshold=3)
    _, replies, _, arrays = _round(hospitals, settings)
    assert arrays is None
    assert {r.error.code for r in replies} == {m.SECURE_AGGREGATION_FAILED}
    assert "fewer than the reconstruction threshold 3" in replies[0].error.reason


def test_ckks_gives_fedavg_and_the_server_cannot_decrypt(ckks_home):
    hospitals = HospitalsGrid(NODES)
    public = _public_of(hospitals)
    settings = SecureAggregationSettings(mode="ckks")
    _, _, start, arrays = _round(hospitals, settings, public=public)
    _assert_fedavg(arrays, NODES, start, 2e-6)  # the sum comes back on a 2^-20 grid
    uploads = [content for _, content in hospitals.received
               if content is not None and isinstance(content.get(m.SECAGG_RECORD), ArrayRecord)
               and m.METRICS_RECORD in content]
    assert len(uploads) == len(NODES)
    server_key = ckks.load_public_context(public, "server")
    for content in uploads:
        ciphertexts = ciphertexts_of(content[m.SECAGG_RECORD])
        assert m.ARRAYS_RECORD not in content
        with pytest.raises(Exception):  # noqa: B017 - TenSEAL raises its own error types
            ckks.decrypt(server_key, ciphertexts, 10)


def test_ckks_completes_with_the_hospitals_that_replied(ckks_home):
    hospitals = HospitalsGrid(NODES, silent={202: m.STAGE_CKKS_COLLECT})
    public = _public_of(hospitals)
    _, _, start, arrays = _round(hospitals, SecureAggregationSettings(mode="ckks"),
                                 public=public)
    _assert_fedavg(arrays, [101, 303, 404], start, 2e-6)


def test_a_server_optimiser_runs_on_the_secure_aggregate():
    settings = SecureAggregationSettings(mode="secagg_plus")
    kwargs = dict(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2, min_train_nodes=2)
    _, _, start, secure = _round(HospitalsGrid(NODES), settings, FedAdam(**kwargs))
    plain_strategy = FedAdam(**kwargs)
    plain_grid = HospitalsGrid(NODES)
    messages = plain_strategy.configure_train(1, start, ConfigRecord({"x": 1}), plain_grid)
    plain, _ = plain_strategy.aggregate_train(1, plain_grid.send_and_receive(messages))
    for name in plain:
        assert np.abs(secure[name].numpy() - plain[name].numpy()).max() < 1e-4, name


def test_client_level_dp_clips_in_the_hospital_and_noises_the_secure_sum():
    """Flower's client-side fixed-clipping wrapper over FedAvg: each hospital's update is
    clipped by the ClientApp's clipping mod before it is masked; the server's noise goes on
    the mean of the clipped updates, which is all it sees."""
    clip = 0.05
    strategy = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2, min_train_nodes=2),
        noise_multiplier=1e-6, clipping_norm=clip, num_sampled_clients=len(NODES))
    hospitals = HospitalsGrid(NODES)
    grid = SecureAggregationGrid(hospitals, SecureAggregationSettings(mode="secagg_plus"), 1)
    start = ArrayRecord({k: Array(v + 0.5) for k, v in ADAPTER.items()})
    replies = list(grid.send_and_receive(
        strategy.configure_train(1, start, ConfigRecord({"x": 1}), grid)))
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = {}
    for k, value in start.items():
        steps = []
        for node in NODES:
            step = step_of(node)
            norm = np.sqrt(sum(float((s.astype(np.float64) ** 2).sum()) for s in step.values()))
            steps.append(step[k] * min(1.0, clip / norm))
        expected[k] = value.numpy() + np.mean(steps, axis=0)
    for k in expected:
        assert np.abs(arrays[k].numpy() - expected[k]).max() < 1e-5, k


# --- A hospital refuses what would reveal one hospital's update ---------------------------

def _stage_message(node, record):
    msg = Message(RecordDict({m.SECAGG_RECORD: ConfigRecord(record)}), dst_node_id=node,
                  message_type="train")
    msg.metadata.__dict__["_message_id"] = "x"
    return msg


def _never_called(msg, context):
    raise AssertionError("the train handler must not run for a key stage")


def test_a_hospital_refuses_a_threshold_of_one_and_a_second_unmask():
    hospitals = HospitalsGrid(NODES)
    context = hospitals.contexts[101]
    reply = through_hospital(_stage_message(101, {
        m.SECAGG_STAGE: m.STAGE_SETUP, m.SECAGG_ROUND: 1, m.SECAGG_THRESHOLD: 1,
        m.SECAGG_CLIPPING_RANGE: 4.0, m.SECAGG_QUANTIZATION_RANGE: 2**24,
        m.SECAGG_MAX_WEIGHT: 100.0}), context, _never_called)
    assert reply.error.reason == "4011 stage-refused"
    assert "one share would reveal a secret" in hospital_log(context)
    _round(hospitals, SecureAggregationSettings(mode="secagg_plus"))
    reply = through_hospital(_stage_message(101, {
        m.SECAGG_STAGE: m.STAGE_UNMASK, m.SECAGG_ROUND: 1, m.SECAGG_ALIVE: [101, 202, 303],
        m.SECAGG_SIGNERS: [], m.SECAGG_SIGNATURE: []}), context, _never_called)
    assert reply.error.reason == "4011 stage-refused" and "no keys" in hospital_log(context)


def test_a_hospital_decrypts_only_a_sum_it_is_part_of_once_a_round(ckks_home):
    hospitals = HospitalsGrid(NODES)
    _round(hospitals, SecureAggregationSettings(mode="ckks"), public=_public_of(hospitals))
    context = hospitals.contexts[101]

    def ask(contributors, round_):
        return through_hospital(_stage_message(101, {
            m.SECAGG_STAGE: m.STAGE_CKKS_DECRYPT, m.SECAGG_ROUND: round_,
            m.SECAGG_NODES: contributors, m.SECAGG_THRESHOLD: 2, m.SECAGG_LENGTH: 3}),
            context, _never_called)

    for contributors, round_, why in (
            ([101, 202], 2, "encrypted no update"), ([202, 303], 1, "did not contribute"),
            # Fewer than its own round's threshold (3 of 4), whatever the request says.
            ([101], 1, "fewer than 3"),
            # Round 1 was decrypted by the lowest node id (101) during the round.
            ([101, 202, 303], 1, "already decrypted")):
        assert ask(contributors, round_).error.reason == "4011 stage-refused"
        assert why in hospital_log(context).rsplit("refused as", 1)[-1]  # the latest


def test_a_hospital_masks_one_update_a_round():
    # A second collect under the same masks would hand the server the difference of two
    # updates: refused, before any training.
    hospitals = HospitalsGrid(NODES)
    settings = SecureAggregationSettings(mode="secagg_plus")
    grid = SecureAggregationGrid(hospitals, settings, 100)
    start = ArrayRecord({k: Array(v) for k, v in ADAPTER.items()})
    strategy = FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2, min_train_nodes=2)
    list(grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord({"x": 1}),
                                                        grid)))
    secrets = {m.SECAGG_STAGE: m.STAGE_SHARE_KEYS, m.SECAGG_ROUND: 1, m.SECAGG_NODES: [],
               m.SECAGG_PUBLIC_KEY_1: [], m.SECAGG_PUBLIC_KEY_2: [],
               m.SECAGG_SIGNING_KEY: [], m.SECAGG_SIGNATURE: []}
    reply = through_hospital(_stage_message(101, secrets), hospitals.contexts[101],
                                   _never_called)
    assert reply.has_error()  # the round's secrets are gone after unmasking
    hospitals = HospitalsGrid(NODES, silent={n: m.STAGE_UNMASK for n in NODES})
    grid = SecureAggregationGrid(hospitals, settings, 100)
    list(grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord({"x": 1}),
                                                        grid)))
    collect = {m.SECAGG_STAGE: m.STAGE_COLLECT, m.SECAGG_ROUND: 1, m.SECAGG_SOURCES: [],
               m.SECAGG_CIPHERTEXTS: []}
    reply = through_hospital(_stage_message(101, collect), hospitals.contexts[101],
                             _never_called)
    assert reply.error.reason == "4011 stage-refused"
    assert "collect asked after stage 'collect'" in hospital_log(hospitals.contexts[101])


def test_a_deployed_hospital_without_key_material_is_told_how_to_make_it(tmp_path):
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 3,
                                                        "data-path": str(tmp_path / "x.csv")},
                      state=RecordDict(), run_config={})
    with pytest.raises(ckks.KeyMaterialError, match="hospital 3.*deploy/ckks-keys.sh"):
        ckks_context_path(context)


# --- Settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    (["secure_aggregation=secagg_plus", "strategy=krum"], "strategy.name"),
    (["secure_aggregation=ckks", "strategy=fedmedian"], "strategy.name"),
    (["secure_aggregation=ckks", "strategy=fedtrimmedavg"], "strategy.name"),
    (["secure_aggregation=secagg_plus", "secure_aggregation.reconstruction_threshold=3"],
     "strategy.min_hospitals"),
    (["secure_aggregation=secagg_plus", "secure_aggregation.reconstruction_threshold=1"],
     "secure_aggregation.reconstruction_threshold"),
])
def test_settings_that_would_need_individual_updates_or_cannot_release_are_refused(
        overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_run_settings(compose_config(overrides))


def test_the_modes_compose_with_dp_sgd_and_client_level_dp():
    for mode in ("secagg_plus", "ckks"):
        settings = to_run_settings(compose_config([f"secure_aggregation={mode}",
                                                   "privacy=dp_sgd_central_dp"]))
        assert settings.secure_aggregation.mode == SecureAggregationMode(mode)


# --- Bad key material and too few hospitals stop the run before training -------------------

def _preflight(tiny_random_bert, tmp_path, node_config=None):
    settings = task_settings_to_yaml(task(tiny_random_bert, "secure_aggregation=ckks"))
    return hospital_preflight(settings, tmp_path / "state", run_id=3, node_config=node_config)


def test_a_hospital_without_ckks_key_material_stops_the_run_at_preflight(
        tiny_random_bert, tmp_path):
    status = _preflight(tiny_random_bert, tmp_path)
    assert not status[m.PREFLIGHT_OK]
    assert status[m.PREFLIGHT_PROBLEM] == "4012 key-material"  # the server learns what failed
    log = tmp_path / "state" / "hospital.log"
    assert "hospital 0" in log.read_text() and "ckks-context=" in log.read_text()  # how to fix
    # The public file is not a hospital's key: it holds no secret key.
    _, public = ckks.generate_key_material(tmp_path / "keys")
    status = _preflight(tiny_random_bert, tmp_path, {"ckks-context": str(public)})
    assert status[m.PREFLIGHT_PROBLEM] == "4012 key-material"
    assert str(public) in log.read_text().rsplit("refused as", 1)[-1]


def _report(hospital, secret_path):
    public = ckks.public_bytes(ckks.load_secret_context(secret_path, "test"))
    return HospitalReport(node_id=100 + hospital, hospital=hospital, train_records=10,
                          eval_records=5, label_counts=[], ckks_public=public,
                          ckks_fingerprint=ckks.fingerprint(public))


def test_hospitals_with_other_ckks_key_material_are_named(tmp_path):
    shared, shared_public = ckks.generate_key_material(tmp_path / "shared")
    other, _ = ckks.generate_key_material(
        tmp_path / "other", ckks.CkksParameters(4096, (40, 40), 30))
    reports = [_report(0, shared), _report(1, other), _report(2, shared)]
    settings = SecureAggregationSettings(mode="ckks")
    with pytest.raises(ckks.KeyMaterialError, match=r"hospital 1 \(key [0-9a-f]+\)"):
        check_ckks_keys(settings, reports)
    assert check_ckks_keys(settings, [reports[0], reports[2]]) == reports[0].ckks_public
    # The server checks the key it received, not the fingerprint a hospital claims.
    forged = _report(1, other)
    forged.ckks_fingerprint = reports[0].ckks_fingerprint
    with pytest.raises(ckks.KeyMaterialError, match="hospital 1"):
        check_ckks_keys(settings, [reports[0], forged])
    # The operator's public context pins the key: hospitals 0 and 2 hold another one.
    pinned = SecureAggregationSettings(mode="ckks", ckks_public_context=str(
        tmp_path / "missing.ctx"))
    with pytest.raises(ckks.KeyMaterialError, match="missing.ctx is not a file"):
        check_ckks_keys(pinned, reports)
    _, other_public = ckks.generate_key_material(tmp_path / "third")
    pinned = SecureAggregationSettings(mode="ckks", ckks_public_context=str(other_public))
    with pytest.raises(ckks.KeyMaterialError, match="hospital 0 .*hospital 2 .*the operator"):
        check_ckks_keys(pinned, [reports[0], reports[2]])
    pinned = SecureAggregationSettings(mode="ckks", ckks_public_context=str(shared_public))
    assert check_ckks_keys(pinned, [reports[0], reports[2]])


def test_default_threshold_is_a_majority_of_the_hospitals_each_shares_with():
    settings = SecureAggregationSettings(mode="ckks", num_shares=4)
    assert settings.shares_for(10) == 5  # a ring is odd: 4 is rounded up, as Flower does
    assert settings.threshold_for(10) == 3
    assert SecureAggregationSettings(mode="secagg_plus").threshold_for(10) == 6
    assert SecureAggregationSettings(mode="secagg_plus").threshold_for(2) == 2


def test_fewer_hospitals_than_the_threshold_stop_the_run_before_training(tmp_path):
    settings = to_run_settings(compose_config(["secure_aggregation=secagg_plus"]))
    reports = [HospitalReport(1, 0, 10, 5, []),
               HospitalReport(2, 1, 10, 5, [], declined="its own policy")]
    federation = Federation(task=None, task_config=None, reports=reports)
    with pytest.raises(ConfigError, match="1 hospital.*fewer than the reconstruction "
                                          "threshold 2"):
        secure_aggregation_grid(None, settings, federation, None)


# --- CKKS: no sum of fewer hospitals than distributed DP's noise shares assume ---------------

def test_hostile_server_honest_ckks_exclusion_stops_the_round_before_any_decryption(
        ckks_home):
    """Five hospitals planned t = 3 (each adds sigma/sqrt(3)); two ran out of budget, so the
    round samples three, and the settings' threshold for three is 2; one more drops. The
    server holds the round to the plan's t: 2 updates < 3, nothing is decrypted."""
    from strategies.privacy_budget import PrivacyBudgetGate

    nodes = [101, 202, 303, 404, 505]
    hospitals = HospitalsGrid(nodes, silent={303: m.STAGE_CKKS_COLLECT})
    settings = SecureAggregationSettings(mode="ckks")
    assert settings.threshold_for(3) == 2
    aborted = []
    grid = SecureAggregationGrid(hospitals, settings, max(map(records_of, nodes)),
                                 _public_of(hospitals), noise_threshold=3,
                                 on_abort=lambda round_, why: aborted.append((round_, why)))
    strategy = PrivacyBudgetGate(FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2,
                                        min_train_nodes=2))
    for spent in (404, 505):  # out of budget: the gate sends them no more work
        strategy.exclude(spent, "privacy-budget-refused")
    start = ArrayRecord({k: Array(v) for k, v in ADAPTER.items()})
    messages = list(strategy.configure_train(1, start, ConfigRecord({"x": 1}), grid))
    assert sorted(msg.metadata.dst_node_id for msg in messages) == [101, 202, 303]
    replies = list(grid.send_and_receive(messages))
    assert all(r.has_error() for r in replies)
    assert aborted == [(1, "updates received: 2 hospital(s), fewer than the reconstruction "
                           "threshold 3")]
    for node in nodes:  # no hospital was asked to decrypt
        rounds = hospitals.contexts[node].state.config_records.get("ckks-rounds")
        assert rounds is None or not list(rounds["decrypted"])
    # Each contributor was told the round's threshold, 3, with its collect.
    assert strategy.aggregate_train(1, replies) == (None, None)


def test_hostile_server_decrypting_hospital_holds_its_own_threshold(ckks_home):
    """A server that told the contributors t = 3 at collect, then asks one of them to
    decrypt a sum of two saying t = 2, is refused: the hospital keeps the threshold its
    update was encrypted under."""
    hospitals = HospitalsGrid(NODES, silent={404: m.STAGE_CKKS_COLLECT, 303: "ckks-decrypt"})
    settings = SecureAggregationSettings(mode="ckks", reconstruction_threshold=3)
    grid = SecureAggregationGrid(hospitals, settings, max(map(records_of, NODES)),
                                 _public_of(hospitals))
    strategy = FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2, min_train_nodes=2)
    start = ArrayRecord({k: Array(v) for k, v in ADAPTER.items()})
    # Hospitals 101, 202, 303 encrypt under threshold 3; 101 decrypts that round's sum.
    list(grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord({"x": 1}),
                                                        grid)))
    context = hospitals.contexts[202]
    reply = through_hospital(_stage_message(202, {
        m.SECAGG_STAGE: m.STAGE_CKKS_DECRYPT, m.SECAGG_ROUND: 1, m.SECAGG_NODES: [101, 202],
        m.SECAGG_THRESHOLD: 2, m.SECAGG_LENGTH: 3}), context, _never_called)
    assert reply.error.reason == "4011 stage-refused"
    assert "a sum of 2 hospital(s), fewer than 3" in hospital_log(context).rsplit(
        "refused as", 1)[-1]


@pytest.mark.parametrize("other_view", [
    {}, {"clipping_range": 1e-9, "quantization_range": 2**30}, {"max_weight": 1e12},
    {"quantization_range": 2**20}])
def test_hostile_server_per_hospital_parameters_leave_the_sum_masked(other_view):
    """Pairwise masks are keyed by the round's parameters: a server that tells one hospital a
    lattice (or weight, or threshold) of its own, to read the other's levels in the low bits
    of a sum of two, gets masks that do not cancel. Told alike, they cancel exactly."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from clinical_fl.secure_aggregation import secagg_plus, signing
    from clinical_fl.secure_aggregation.masking import mask

    honest = {"threshold": 2, "clipping_range": 4.0, "quantization_range": 2**24,
              "max_weight": 100.0}
    views = {1: honest, 2: {**honest, **other_view}}
    signers = {n: ec.generate_private_key(ec.SECP384R1()) for n in (1, 2)}
    roster = signing.Roster(frozenset(signing.public_bytes(k) for k in signers.values()))
    setups = {n: secagg_plus.setup(1, n, **views[n], run_id=7, signer=signers[n])
              for n in (1, 2)}
    secrets = {n: s for n, (s, _) in setups.items()}

    def share(node):
        return secagg_plus.share_keys(
            secrets[node], {n: (s.pk1, s.pk2) for n, s in secrets.items()},
            {n: s.signing_key for n, s in secrets.items()},
            {n: signature for n, (_, signature) in setups.items()}, roster)

    if other_view:
        # The round keys are signed under each hospital's round parameters: told others,
        # a hospital finds its neighbour's signature invalid before sharing anything.
        with pytest.raises(secagg_plus.KeyUnauthenticated):
            share(1)
        return
    sent = {n: share(n) for n in secrets}
    for node, own in secrets.items():
        other = 3 - node
        secagg_plus.receive_shares(own, [other], [sent[other][1][0]])
    levels = np.zeros(64, dtype=np.uint32)
    masked = {n: secagg_plus.masked_levels(s, levels, 0) for n, s in secrets.items()}
    pairwise = masked[1] + masked[2] - mask(secrets[1].rd_seed, 65) - mask(secrets[2].rd_seed,
                                                                             65)
    assert not pairwise.any()


# --- CKKS decryption requests bound to the round's signed contributions (issue 34) ------------

def test_lying_server_ckks_decrypt_needs_the_contributors_signatures(ckks_home):
    from clinical_fl.secure_aggregation import signing

    hospitals = HospitalsGrid(NODES)
    _round(hospitals, SecureAggregationSettings(mode="ckks"), public=_public_of(hospitals))
    # What the collect replies carried: each hospital's ciphertexts and signed contribution.
    uploads = {src: c for src, c in hospitals.received
               if c is not None and m.SECAGG_CONTRIBUTION_RECORD in c}
    assert sorted(uploads) == NODES
    honest = {
        m.SECAGG_SIGNING_KEY: [bytes(uploads[n][m.SECAGG_CONTRIBUTION_RECORD][
            m.SECAGG_SIGNING_KEY]) for n in NODES],
        m.SECAGG_SIGNATURE: [bytes(uploads[n][m.SECAGG_CONTRIBUTION_RECORD][
            m.SECAGG_SIGNATURE]) for n in NODES],
        m.SECAGG_DIGEST: [signing.ciphertexts_digest(ciphertexts_of(uploads[n][
            m.SECAGG_RECORD])) for n in NODES]}
    total = ckks.add(ckks.load_public_context(_public_of(hospitals), "test"),
                     [ciphertexts_of(uploads[n][m.SECAGG_RECORD]) for n in NODES])

    length = sum(a.size for a in ADAPTER.values()) + 1

    def ask(node, nodes=NODES, **binding):
        message = _stage_message(node, {
            m.SECAGG_STAGE: m.STAGE_CKKS_DECRYPT, m.SECAGG_ROUND: 1, m.SECAGG_NODES: nodes,
            m.SECAGG_THRESHOLD: 3, m.SECAGG_LENGTH: length, **honest, **binding})
        message.content[m.ARRAYS_RECORD] = ciphertext_record(total)
        return through_hospital(message, hospitals.contexts[node], _never_called)

    def flipped(column, index):
        values = list(honest[column])
        values[index] = values[index][:-1] + bytes([values[index][-1] ^ 1])
        return values

    unauthenticated = "4016 secagg-unauthenticated"
    # A forged signature, a tampered digest, and hospital 202's own entry not its own.
    assert ask(202, **{m.SECAGG_SIGNATURE: flipped(m.SECAGG_SIGNATURE, 2)}).error.reason \
        == unauthenticated
    assert ask(202, **{m.SECAGG_DIGEST: flipped(m.SECAGG_DIGEST, 0)}).error.reason \
        == unauthenticated
    # An invented fourth contributor made of another's signed entry (to reach a threshold).
    assert ask(202, nodes=[*NODES, 999], **{k: [*v, v[0]] for k, v in honest.items()}
               ).error.reason == unauthenticated
    # Signed for round 1 of run 7: read as another round, nothing verifies.
    statement = signing.contribution_statement(7, 1, 101, honest[m.SECAGG_DIGEST][0])
    assert signing.verify(honest[m.SECAGG_SIGNING_KEY][0], honest[m.SECAGG_SIGNATURE][0],
                          statement)
    assert not signing.verify(honest[m.SECAGG_SIGNING_KEY][0], honest[m.SECAGG_SIGNATURE][0],
                              signing.contribution_statement(7, 2, 101,
                                                             honest[m.SECAGG_DIGEST][0]))
    # The honest binding: hospital 303 decrypts the sum (once).
    reply = ask(303)
    assert reply.has_content(), hospital_log(hospitals.contexts[303])[-3000:]
    top = max(records_of(n) for n in NODES)
    expected = sum(np.append(np.concatenate([step_of(n)[k].ravel() for k in ADAPTER]),
                             1.0) * records_of(n) / top for n in NODES)
    vector = reply.content[m.ARRAYS_RECORD][m.SECAGG_VECTOR].numpy()
    assert vector.size == length and np.abs(vector - expected).max() < 1e-5
