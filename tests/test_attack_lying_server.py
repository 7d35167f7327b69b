"""SecAgg+ against a server that lies (issue 34): the attack a review found, which recovered
one hospital's update exactly with the honest-but-curious protocol, and each lie on its own.
The hospitals are the real ClientApp mods in process (tests/lying_server.py); the server
is played by hand so that it can lie at any stage. Each lie must be refused with its code,
and nothing that unmasks anything may reach the server."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from clinical_fl.protocol import messages as m
from clinical_fl.secure_aggregation import secagg_plus, signing
from clinical_fl.secure_aggregation.masking import dequantize_sum, mask
from clinical_fl.secure_aggregation.update_vector import weighted_update
from tests.lying_server import CLIPPING_RANGE, LEVELS, LyingServer, SignedKeys
from tests.secure_hospitals import ADAPTER, records_of, step_of

H1, H2, H3, H4, H5 = NODES = [11, 22, 33, 44, 55]
UNAUTHENTICATED, INCONSISTENT = "4016 secagg-unauthenticated", "4017 secagg-inconsistent"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test's hospitals keep their simulation keys and roster in their own FLWR_HOME;
    Flower stamps messages with the run and node of the process, which tests play."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def _update_of(server: LyingServer, node: int) -> np.ndarray:
    """Hospital ``node``'s weighted update, as its mod quantises it (without the weight)."""
    trained = {k: v + step_of(node)[k] for k, v in server.start.items()}
    share = round(records_of(node) / server.max_weight * LEVELS) / LEVELS
    return weighted_update(trained, server.start, share)[:-1]


def _withheld_round() -> tuple[LyingServer, dict[int, np.ndarray]]:
    """The review's opening: hospital 1 gets the shares of 2 and 3 only (4 and 5, it is told,
    dropped), so it masks against 2 and 3 alone; the others get every share. All five
    upload."""
    server = LyingServer(NODES, threshold=3)
    inbox = server.share_all(server.setup())
    inbox[H1] = {src: c for src, c in inbox[H1].items() if src in (H2, H3)}
    masked = {n: server.collect(n, inbox[n]) for n in NODES}
    return server, masked


def test_lying_server_withheld_shares_target_is_real():
    """What the attack needs does unmask hospital 1: its seed and the private keys of the two
    hospitals it masked against (read here from the hospitals' own state, never sent)."""
    server, masked = _withheld_round()
    secrets = {n: server.secrets_of(n) for n in NODES}
    assert secrets[H1].mask_partners == [H2, H3]
    vector = masked[H1] - mask(secrets[H1].rd_seed, masked[H1].size)
    for partner in (H2, H3):  # the smaller node id subtracted each pairwise mask
        vector += secagg_plus.pairwise_mask(secagg_plus.generate_shared_key(
            secagg_plus.bytes_to_private_key(secrets[partner].sk1),
            secagg_plus.bytes_to_public_key(secrets[H1].pk1)), secrets[H1].digest, vector.size)
    recovered = dequantize_sum(vector[:-1], 1, CLIPPING_RANGE, LEVELS)
    assert np.abs(recovered - _update_of(server, H1)).max() < 1e-6


# The review's lies after the withheld shares. Each hospital answers one consistency and one
# unmask a round, so each story is one round; (alive list sent at consistency and unmask).
STORIES = {
    # The review's: hospital 2 told 3 dropped, 3 told 2 dropped, 4 and 5 told both dropped:
    # 2, 3, 4, 5 would hand over 1's seed shares, 3, 4, 5 hospital 2's key, 2, 4, 5 hospital 3's.
    "review": {H1: [H1, H2, H3], H2: [H1, H2, H4, H5], H3: [H1, H3, H4, H5],
               H4: [H1, H4, H5], H5: [H1, H4, H5]},
    # One list for all, 2 and 3 dropped: consistent, but hospital 1 did not get 4's and 5's
    # shares and 2 and 3 are listed as dropped though they uploaded.
    "consistent": {n: [H1, H4, H5] for n in NODES},
    # 2 and 3 dropped for 4 and 5 only, alive for the rest.
    "split": {H1: NODES, H2: NODES, H3: NODES, H4: [H1, H4, H5], H5: [H1, H4, H5]},
}


@pytest.mark.parametrize("story", STORIES)
def test_lying_server_cannot_unmask_one_hospital_from_withheld_shares(story):
    server, _ = _withheld_round()
    alive = STORIES[story]
    signatures, refused = {}, {}
    for node in NODES:
        reply = server.consistency(node, alive[node])
        if reply.has_error():
            refused[node] = reply.error.reason
        else:
            signatures[node] = bytes(server.answer(reply)[m.SECAGG_SIGNATURE])
    # Every signature, to every hospital, with the list it signed: the most a liar can show.
    for node in signatures:
        reply = server.unmask(node, alive[node], signatures)
        assert reply.has_error(), f"hospital {node} unmasked under story {story}"
        refused[node] = reply.error.reason
    assert refused == {n: INCONSISTENT for n in NODES}, refused
    assert server.revealed() == []


def test_lying_server_honest_round_unmasks_the_sum():
    """The same driver, telling the truth, gets the sum: the refusals above are the lies'."""
    server = LyingServer(NODES, threshold=3)
    keys = server.setup()
    inbox = server.share_all(keys)
    masked = {n: server.collect(n, inbox[n]) for n in NODES[:4]}  # hospital 5 is lost
    alive = sorted(masked)
    signatures = {n: bytes(server.answer(server.consistency(n, alive))[m.SECAGG_SIGNATURE])
                  for n in alive}
    shares: dict[int, list[bytes]] = {}
    for node in alive:
        record = server.answer(server.unmask(node, alive, signatures))
        for owner, share in zip(record[m.SECAGG_SHARE_OWNERS], record[m.SECAGG_SHARE_VALUES],
                                strict=True):
            shares.setdefault(int(owner), []).append(bytes(share))
    assert set(shares) == set(NODES)  # seeds of the alive four, hospital 5's key
    digest = secagg_plus.round_digest(1, 3, CLIPPING_RANGE, LEVELS, server.max_weight)
    total = secagg_plus.unmasked_sum(masked, shares, {n: NODES for n in NODES},
                                     {n: k.pk1 for n, k in keys.items()}, [H5], 3, digest)
    released = dequantize_sum(total[:-1], 4, CLIPPING_RANGE, LEVELS)
    expected = sum(_update_of(server, n) for n in alive)
    assert np.abs(released - expected).max() < 1e-5


# --- Each lie on its own ------------------------------------------------------------------

def _server_keys() -> SignedKeys:
    """Round keys the server made, signed with a long-term key of its own (not in any
    hospital's roster)."""
    own = ec.generate_private_key(ec.SECP384R1())
    secrets, signature = secagg_plus.setup(1, H2, 3, CLIPPING_RANGE, LEVELS, 80.0, 7, own)
    return SignedKeys(secrets.pk1, secrets.pk2, secrets.signing_key, signature)


def _flip(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


KEY_LIES = {
    # The server's own key pair in place of hospital 2's (its signature kept): hospital 1's
    # shares for 2 would be encrypted to the server.
    "swapped-public-key": lambda k: {**k, H2: SignedKeys(
        _server_keys().pk1, _server_keys().pk2, k[H2].signing_key, k[H2].signature)},
    # The server's keys, validly signed by the server's own long-term key.
    "server-signing-key": lambda k: {**k, H2: _server_keys()},
    "forged-signature": lambda k: {**k, H2: SignedKeys(
        k[H2].pk1, k[H2].pk2, k[H2].signing_key, _flip(k[H2].signature))},
    # One roster hospital listed twice (a sybil inflating the count the threshold is
    # checked against).
    "one-hospital-twice": lambda k: {**k, 66: SignedKeys(
        _server_keys().pk1, _server_keys().pk2, k[H2].signing_key, k[H2].signature)},
}


@pytest.mark.parametrize("lie", KEY_LIES)
def test_lying_server_key_list_is_refused_before_any_share(lie):
    server = LyingServer(NODES, threshold=3)
    keys = server.setup()
    reply = server.share_keys(H1, KEY_LIES[lie](keys))
    assert reply.has_error() and reply.error.reason == UNAUTHENTICATED
    # Nothing was shared; the honest list still works (the lie cost the round nothing else).
    assert m.SECAGG_CIPHERTEXTS not in (server.hospitals.received[-1][1] or {})


def test_lying_server_replayed_keys_and_signatures_of_an_earlier_round_are_refused():
    first = LyingServer(NODES, threshold=3)
    old_keys = first.setup()
    inbox = first.share_all(old_keys)
    masked = {n: first.collect(n, inbox[n]) for n in NODES}
    old_signatures = {n: bytes(first.answer(first.consistency(n, NODES))[m.SECAGG_SIGNATURE])
                      for n in NODES}
    # Round 2 of the same run, the same hospitals (their state carried over).
    second = LyingServer(NODES, threshold=3, round_=2)
    second.hospitals = first.hospitals
    keys = second.setup()
    # Hospital 2's round-1 keys and signature replayed into round 2's key list.
    reply = second.share_keys(H1, {**keys, H2: old_keys[H2]})
    assert reply.error.reason == UNAUTHENTICATED
    # A whole round 2 run honestly up to unmask, then round 1's view signatures replayed.
    second = LyingServer(NODES, threshold=3, round_=3)
    second.hospitals = first.hospitals
    inbox = second.share_all(second.setup())
    for node in NODES:
        second.collect(node, inbox[node])
        second.answer(second.consistency(node, NODES))
    reply = second.unmask(H1, NODES, {n: s for n, s in old_signatures.items() if n != H1})
    assert reply.error.reason == INCONSISTENT
    assert masked and second.revealed() == []


def test_lying_server_round_run_again_is_refused_before_any_training():
    """Found by attacking it: five runs of round 1, each over four of five hospitals with the
    same adapter, gave sums whose differences are one hospital's (deterministic) update. A
    hospital sets up one round once a run, and trains only for the round its keys are of."""
    server = LyingServer(NODES, threshold=3)
    inbox = server.share_all(server.setup())
    for node in NODES[:4]:
        server.collect(node, inbox[node])
    for node in NODES:  # round 1 again, before or after its update
        reply = server.ask(node, {
            m.SECAGG_STAGE: m.STAGE_SETUP, m.SECAGG_THRESHOLD: 3,
            m.SECAGG_CLIPPING_RANGE: CLIPPING_RANGE, m.SECAGG_QUANTIZATION_RANGE: LEVELS,
            m.SECAGG_MAX_WEIGHT: server.max_weight})
        assert reply.error.reason == INCONSISTENT, node
    # Hospital 5 still holds round 1's keys: a train message of round 2 under them is refused.
    reply = server.ask(H5, {m.SECAGG_STAGE: m.STAGE_COLLECT,
                            m.SECAGG_SOURCES: list(inbox[H5]),
                            m.SECAGG_CIPHERTEXTS: list(inbox[H5].values())},
                       train=True, config={m.SERVER_ROUND_KEY: 2})
    assert reply.error.reason == INCONSISTENT
    trained = [c for _, c in server.hospitals.received
               if c is not None and m.SECAGG_VECTOR in c.get(m.SECAGG_RECORD, {})]
    assert len(trained) == 4  # the first four updates only


def test_lying_server_threshold_below_a_majority_is_refused_with_its_counts():
    server = LyingServer(NODES, threshold=3)
    keys = server.setup(threshold=2)  # 2 of 5: two disjoint groups could each rebuild
    reply = server.share_keys(H1, keys)
    assert reply.error.reason == "4018 secagg-threshold-refused threshold=2 hospitals=5"


def test_lying_server_threshold_below_the_hospitals_own_floor_is_refused(tmp_path):
    """A hospital's policy (min-secure-sum) sets the fewest hospitals in a sum holding its
    update: a server that gives it a smaller round (k = 3, t = 2, a majority of the list it
    chose) is refused before any key is made."""
    server = LyingServer(NODES[:3], threshold=2)
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "privacy-policy.toml").write_text("min-secure-sum = 4\n")
    server.hospitals.contexts[H1].node_config["state-dir"] = str(tmp_path / "h1")
    reply = server.ask(H1, {
        m.SECAGG_STAGE: m.STAGE_SETUP, m.SECAGG_THRESHOLD: 2,
        m.SECAGG_CLIPPING_RANGE: CLIPPING_RANGE, m.SECAGG_QUANTIZATION_RANGE: LEVELS,
        m.SECAGG_MAX_WEIGHT: server.max_weight})
    assert reply.error.reason == "4007 policy-refused key=min-secure-sum"


def _up_to_consistency(server: LyingServer) -> None:
    inbox = server.share_all(server.setup())
    for node in NODES:
        server.collect(node, inbox[node])


def test_lying_server_hospital_listed_as_dropped_refuses_to_sign_and_to_unmask():
    server = LyingServer(NODES, threshold=3)
    _up_to_consistency(server)
    others = [H2, H3, H4, H5]
    assert server.consistency(H1, others).error.reason == INCONSISTENT
    # Signed by the other four, the list that drops hospital 1 still does not get its shares:
    # it refuses to unmask under a list it is not on.
    signatures = {n: bytes(server.answer(server.consistency(n, others))[m.SECAGG_SIGNATURE])
                  for n in others}
    assert server.unmask(H1, others, signatures).error.reason in (INCONSISTENT,
                                                                  "4011 stage-refused")
    assert server.revealed() == []


def test_lying_server_two_alive_lists_to_two_groups_release_nothing():
    server = LyingServer(NODES, threshold=3)
    _up_to_consistency(server)
    lists = {H1: NODES, H2: NODES, H3: [H1, H2, H3, H4], H4: [H1, H2, H3, H4],
             H5: [H1, H2, H3, H4]}
    signatures = {}
    for node in NODES:
        reply = server.consistency(node, lists[node])
        if node == H5:  # left off the list it was shown
            assert reply.error.reason == INCONSISTENT
            continue
        signatures[node] = bytes(server.answer(reply)[m.SECAGG_SIGNATURE])
    for node in signatures:  # two signatures over each list: fewer than 3
        assert server.unmask(node, lists[node], signatures).error.reason == INCONSISTENT
    assert server.revealed() == []


def test_lying_server_unmask_list_other_than_the_signed_one_is_refused():
    server = LyingServer(NODES, threshold=3)
    _up_to_consistency(server)
    signatures = {n: bytes(server.answer(server.consistency(n, NODES))[m.SECAGG_SIGNATURE])
                  for n in NODES}
    assert server.unmask(H1, [H1, H2, H3], signatures).error.reason == INCONSISTENT
    # A forged signature does not count: four valid of five still unmask, three forged do not.
    forged = {n: (_flip(s) if n in (H2, H3, H4) else s) for n, s in signatures.items()}
    assert server.unmask(H5, NODES, forged).error.reason == INCONSISTENT
    assert server.revealed() == []
    assert server.answer(server.unmask(H2, NODES, signatures))[m.SECAGG_SHARE_VALUES]


@pytest.mark.parametrize("other", [
    # The others get an adapter whose update the server can predict (here: another start),
    # or settings that make their update known (a learning rate of nearly 0), so that the
    # sum would be hospital 1's update plus known terms (Pasquini et al., CCS 2022).
    {"start": {k: np.zeros_like(v) for k, v in ADAPTER.items()}},
    {"config": {"lr": 1e-30}},
])
def test_lying_server_different_train_messages_release_nothing(other):
    server = LyingServer(NODES, threshold=3)
    inbox = server.share_all(server.setup())
    server.collect(H1, inbox[H1])
    for node in NODES[1:]:
        server.collect(node, inbox[node], **other)
    signatures = {n: bytes(server.answer(server.consistency(n, NODES))[m.SECAGG_SIGNATURE])
                  for n in NODES}
    # Hospitals 2-5 agree with each other, but hospital 1's view (its train message) differs:
    # every view lacks an alive hospital's signature, so nobody unmasks, not even 1's seed.
    for node in NODES:
        assert server.unmask(node, NODES, signatures).error.reason == INCONSISTENT
    assert server.revealed() == []


def test_lying_server_roster_is_the_hospitals_not_the_servers(tmp_path):
    """The roster a hospital checks is its own (deployment: its node config's file); a key
    outside it is refused however well it is signed."""
    key = ec.generate_private_key(ec.SECP384R1())
    roster = tmp_path / "roster"
    roster.write_bytes(signing.public_bytes(key) + b" hospital-a\n# a comment\n")
    loaded = signing.load_roster(roster, "test")
    assert signing.public_bytes(key) in loaded and len(loaded) == 1
    assert signing.public_bytes(ec.generate_private_key(ec.SECP384R1())) not in loaded
    roster.write_bytes(signing.public_bytes(key) + b"\nnot a key\n")
    with pytest.raises(signing.SigningKeyError, match="line 2"):
        signing.load_roster(roster, "test")


def test_lying_server_deployed_hospital_without_its_own_key_or_roster_refuses(tmp_path):
    """A deployed hospital (state-dir) takes no roster from anyone but its node config: without
    a signing key, without a roster, or with a roster that lacks its own key, it refuses SecAgg+
    before making any key, naming the node config key."""
    from tests.secure_hospitals import provision_signing_keys

    server = LyingServer(NODES[:3], threshold=2)
    context = server.hospitals.contexts[H1]
    context.node_config["state-dir"] = str(tmp_path / "state")

    def setup_reply():
        return server.ask(H1, {
            m.SECAGG_STAGE: m.STAGE_SETUP, m.SECAGG_THRESHOLD: 2,
            m.SECAGG_CLIPPING_RANGE: CLIPPING_RANGE, m.SECAGG_QUANTIZATION_RANGE: LEVELS,
            m.SECAGG_MAX_WEIGHT: server.max_weight}).error.reason

    assert setup_reply() == "4012 key-material key=secagg-signing-key"
    roster = provision_signing_keys([context], tmp_path / "keys")
    del context.node_config["secagg-roster"]
    assert setup_reply() == "4012 key-material key=secagg-roster"
    context.node_config["secagg-roster"] = str(roster)
    roster.write_bytes(signing.public_bytes(ec.generate_private_key(ec.SECP384R1())) + b"\n")
    assert setup_reply() == "4012 key-material key=secagg-roster"
    roster.write_bytes(b"not a key\n")
    assert setup_reply() == "4012 key-material key=secagg-roster"
    assert server.revealed() == [] and "secure-aggregation" not in \
        context.state.config_records
