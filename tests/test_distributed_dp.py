"""Distributed DP-SGD's building blocks (issue 16, in progress): the plan's epsilon against an
independent accountant, and a hospital's noisy clipped gradient sum against plain gradients."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from clinical_fl.protocol import messages as m
from clinical_fl.secure_aggregation import ckks
from clinical_fl.secure_aggregation.masking import dequantize_sum
from clinical_fl.settings.compose import task_settings_to_yaml
from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import ModelSettings, Pooling
from clinical_fl.settings.privacy import Accountant
from fl_app.hospital import client_app
from fl_app.server.grids.secure_aggregation import SecureAggregationGrid
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.learning.batches import make_loader, tokenize
from tasks.model.build import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.privacy.distributed_dp import (
    clipped_gradient_sum,
    continuous_share,
    flat_signal,
    lattice_share,
    plan_distributed_dp,
)
from tasks.privacy.lattice import Lattice
from tasks.privacy.ledger import LedgerStore
from tests.secure_hospitals import provision_signing_keys
from tests.support import independent_epsilon, task


@pytest.fixture(scope="module")
def setup(tiny_bert):
    settings = ModelSettings(name_or_path=str(tiny_bert), max_length=64, pooling=Pooling.model)
    tokenizer = load_tokenizer(settings)
    model = build_model(settings, list(SPECIALTIES), 0, tokenizer)
    for module in model.modules():  # two passes must see the same forward pass
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = load_hospital_data(DataSettings(notes_per_hospital=30), list(SPECIALTIES), 0, 2)
    return model, tokenizer, tokenize(data.train, tokenizer, 64)


def _plan(noise, clip, threshold=2, expected_batch=100):
    return plan_distributed_dp(None, 1e-5, 1000, expected_batch, 1, clip, threshold,
                               noise_multiplier=noise)


def _plain_gradient_sum(model, loader):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    batch = next(iter(loader))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").backward()
    grads = {n: p.grad.detach().clone() for n, p in named}
    model.zero_grad(set_to_none=True)
    return grads


def _flat(arrays):
    return torch.cat([torch.as_tensor(a).flatten().double() for a in arrays.values()])


def test_distributed_dp_without_noise_or_clipping_sums_the_plain_gradients(setup):
    model, tokenizer, records = setup
    loader = make_loader(records, tokenizer, len(records), shuffle=False)
    plain = _plain_gradient_sum(model, loader)
    private = clipped_gradient_sum(model, loader, _plan(0.0, 1e6), poisson_sampling=False)
    assert plain.keys() == private.keys()
    assert all(g.dtype == torch.float64 for g in private.values())
    assert sum(g.norm() for g in plain.values()) > 1e-3
    for name in plain:
        torch.testing.assert_close(private[name].float(), plain[name], rtol=1e-4, atol=1e-6)
    # Opacus' hooks were removed: the model trains as before.
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())


def test_distributed_dp_clips_each_record_and_adds_one_share_of_the_noise(setup):
    model, tokenizer, records = setup
    loader = make_loader(records, tokenizer, len(records), shuffle=False)
    clip, sigma, threshold, batch = 1e-3, 2.0, 4, 50
    plan = _plan(sigma, clip, threshold, batch)
    clipped = clipped_gradient_sum(model, loader, plan, poisson_sampling=False)
    assert _flat(clipped).norm() <= clip * len(records) * (1 + 1e-9)  # a sum of clipped records
    signal = flat_signal(clipped, plan)
    assert np.allclose(signal, -_flat(clipped).numpy() / batch)
    # Each of t hospitals adds variance (sigma C / B)^2 / t.
    expected = sigma * clip / batch / math.sqrt(threshold)
    noise = continuous_share(signal, plan) - signal
    assert noise.std() == pytest.approx(expected, rel=0.05)
    # On SecAgg+'s lattice, read back as the server reads a sum of one share.
    lattice = Lattice(0.05, 2**24)
    levels = lattice_share(signal, plan, lattice)
    assert levels.dtype == np.uint32
    decoded = dequantize_sum(levels.astype(np.uint64) % 2**32, 1, 0.05, 2**24)
    assert (decoded - signal).std() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("accountant", [Accountant.pld, Accountant.rdp])
def test_distributed_dp_epsilon_matches_an_independent_accountant(accountant):
    rounds, delta, threshold, dimension = 200, 1e-5, 3, 344_000
    step = 2 * 0.5 / 2**24  # SecAgg+'s lattice at clipping range 0.5
    plan = plan_distributed_dp(8.0, delta, total_records=1920, expected_batch=128,
                               planned_rounds=rounds, max_grad_norm=1.0, threshold=threshold,
                               accountant=accountant, lattice_step=step, dimension=dimension)
    assert plan.sample_rate == pytest.approx(128 / 1920)
    # The noise the ledgers record: sigma against the lattice's sensitivity, by hand.
    sensitivity = 1.0 / 128
    accounted = plan.noise_multiplier * sensitivity / (
        sensitivity + step * math.sqrt(dimension) * (1 + threshold / 2))
    assert plan.round_step() == pytest.approx((accounted, 128 / 1920, 1), rel=1e-12)
    assert 0.98 < accounted / plan.noise_multiplier < 1.0
    ours = plan.epsilon(rounds, delta, accountant)
    assert 7.9 <= ours <= 8.0
    assert ours == pytest.approx(independent_epsilon(
        [(accounted, plan.sample_rate, rounds)], delta, accountant), rel=1e-6)
    # Were only this hospital's share of the noise to protect it: a weaker guarantee.
    alone = plan.noise_multiplier / math.sqrt(threshold) * sensitivity / (
        sensitivity + step * math.sqrt(dimension) * 1.5)
    fallback = plan.epsilon(rounds, delta, accountant, fallback=True)
    assert fallback == pytest.approx(independent_epsilon(
        [(alone, plan.sample_rate, rounds)], delta, accountant), rel=1e-6)
    assert fallback > ours
    # CKKS adds the continuous Gaussian: nothing to inflate.
    ckks = plan_distributed_dp(8.0, delta, 1920, 128, rounds, 1.0, threshold, Accountant.rdp)
    assert ckks.accounted_noise_multiplier == ckks.noise_multiplier


def test_distributed_dp_noise_floor_of_a_hospital_policy_raises_only_its_own_share():
    plan = _plan(2.0, 1.0, threshold=4)
    assert plan.share_noise_multiplier == pytest.approx(1.0)
    floored = replace(plan, own_noise_floor=1.5)
    assert floored.share_noise_multiplier == 1.5
    assert floored.round_step() == plan.round_step()  # the joint noise is not counted higher
    assert floored.epsilon(50, 1e-5, Accountant.rdp, fallback=True) < plan.epsilon(
        50, 1e-5, Accountant.rdp, fallback=True)


def test_distributed_dp_refuses_a_threshold_of_one():
    with pytest.raises(ValueError, match="threshold of 1"):
        plan_distributed_dp(8.0, 1e-5, 100, 10, 5, 1.0, 1)


def test_distributed_dp_samples_in_secret_and_an_empty_draw_still_sends_its_noise(setup):
    model, tokenizer, records = setup
    loader = make_loader(records, tokenizer, 8, shuffle=False)
    # q = 1e-6: the Poisson draw is empty (all but surely); the share is the noise alone.
    rare = plan_distributed_dp(None, 1e-5, 10**6, 1, 1, 1e-3, 2, noise_multiplier=3.0)
    empty = clipped_gradient_sum(model, loader, rare)
    assert all(float(g.abs().max()) == 0.0 for g in empty.values())
    noise = continuous_share(flat_signal(empty, rare), rare)
    assert noise.std() == pytest.approx(3.0 * 1e-3 / math.sqrt(2), rel=0.05)
    # Half the records on average, drawn from OS entropy: two draws differ.
    half = plan_distributed_dp(None, 1e-5, len(records), len(records) / 2, 1, 1e6, 2,
                               noise_multiplier=0.0)
    first = clipped_gradient_sum(model, loader, half)
    second = clipped_gradient_sum(model, loader, half)
    assert any(not torch.equal(first[n], second[n]) for n in first)


# --- One round through the real ClientApp, the secure Grid and Flower's FedAvg ---------------

class ClientAppGrid(Grid):
    """Hands each message to the real ClientApp (its mods and handlers) of hospital k.
    ``simulated``: node configs as a simulation's (no state-dir, so not a deployed hospital;
    the state lives under $FLWR_HOME, which the caller points at a temporary folder)."""

    def __init__(self, state: Path, hospitals: int = 2, simulated: bool = False) -> None:
        self.contexts = {100 + k: Context(run_id=5, node_id=100 + k, state=RecordDict(),
                                          run_config={}, node_config={
                                              "partition-id": k, "num-partitions": hospitals,
                                              **({} if simulated else
                                                 {"state-dir": str(state / f"h{k}"),
                                                  "deid": "allowed"})})
                         for k in range(hospitals)}
        if not simulated:  # deployed hospitals sign SecAgg+ round keys with their own keys
            provision_signing_keys(self.contexts.values(), state / "signing")
        self.received: list[RecordDict | None] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            reply = client_app.app(msg, self.contexts[msg.metadata.dst_node_id])
            self.received.append(RecordDict(dict(reply.content.items()))
                                 if reply.has_content() else None)
            replies.append(reply)
        return replies

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def create_message(self, *args):
        raise NotImplementedError

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def get_nodes(self):
        return []


def _distributed_task(model_path, mode="secagg_plus", **plan):
    # float32: bf16 autocast (auto on CPUs that have it) would differ from the plain pass.
    settings = task(model_path, "privacy=distributed_dp", f"secure_aggregation={mode}",
                    "train.precision=fp32",
                    "privacy.distributed_dp.target_epsilon=null",
                    "privacy.distributed_dp.noise_multiplier=1.0")
    settings.privacy.distributed_dp = replace(settings.privacy.distributed_dp, **plan)
    return settings


def _round(settings, state_dir, start):
    grid = ClientAppGrid(state_dir)
    public = None
    if settings.secure_aggregation.mode.value == "ckks":  # one key, as deploy/ckks-keys.sh
        secret = ckks.simulation_secret_context(state_dir / "ckks")
        for context in grid.contexts.values():
            context.node_config["ckks-context"] = str(secret)
        public = ckks.public_bytes(ckks.load_secret_context(secret, "test"))
    secure = SecureAggregationGrid(grid, settings.secure_aggregation, 1, public,
                                   sum_updates=True)
    strategy = FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2, min_train_nodes=2)
    config = ConfigRecord({m.TASK_KEY: task_settings_to_yaml(settings)})
    replies = list(secure.send_and_receive(strategy.configure_train(
        1, ArrayRecord(start), config, secure)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    return grid, replies, arrays


@pytest.mark.parametrize("mode", ["secagg_plus", "ckks"])
def test_distributed_dp_round_without_noise_is_one_sgd_step_on_the_union(
        tiny_bert, tmp_path, process_identity, mode):
    """q = 1 (every record in the round's batch), no noise, clipping that never bites, and
    the server's step is SGD at rate 1 (FedAvg of the plain sum): one distributed round is
    the global adapter minus the mean gradient over both hospitals' records, over SecAgg+'s
    lattice and over CKKS."""
    members = [Hospital(task(tiny_bert, "train.precision=fp32"), list(SPECIALTIES), k, 2)
               for k in range(2)]
    total = sum(len(h.train_records) for h in members)
    # A hospital refuses sigma = 0 (no noise is no privacy): 1e-12 adds nothing measurable
    # at this clipping norm.
    settings = _distributed_task(tiny_bert, mode, max_grad_norm=1e4, sample_rate=1.0,
                                 noise_multiplier=1e-12, threshold=2, target_delta=1e-5,
                                 expected_batch_size=total)
    # The process's cached model serves the handlers too: without dropout for this test, so
    # that both passes see the same function.
    model, tokenizer = members[0].model, members[0].tokenizer
    dropouts = [(mod, mod.p) for mod in model.modules() if isinstance(mod, torch.nn.Dropout)]
    start = trainable_state(model)
    try:
        for module, _ in dropouts:
            module.p = 0.0
        parts = []
        for hospital in members:
            load_trainable_state(model, start)
            loader = make_loader(hospital.train_records, tokenizer,
                                 len(hospital.train_records), shuffle=False)
            parts.append(_plain_gradient_sum(model, loader))
        gradient = {k: parts[0][k] + parts[1][k] for k in parts[0]}
        grid, replies, arrays = _round(settings, tmp_path, start)
    finally:
        for module, p in dropouts:
            module.p = p
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies
                                                      if r.has_error()]
    for name, value in arrays.items():
        # To SecAgg+'s lattice (two hospitals' rounding at 2 x 0.25 / 2^24) or CKKS' 2^-20 grid.
        torch.testing.assert_close(torch.from_numpy(value.numpy()),
                                   start[name] - gradient[name] / total, rtol=1e-4, atol=2e-6)
    # On the wire (the spy: every reply the server received), no hospital's share: masked
    # uint32 vectors, uniform over 2^32 and unrelated to the hospital's own share.
    uploads = [c for c in grid.received if c is not None and m.METRICS_RECORD in c]
    assert len(uploads) == 2
    for content, part in zip(uploads, parts, strict=True):
        assert m.ARRAYS_RECORD not in content
        if mode == "ckks":
            continue  # ciphertexts (tests/test_secure_aggregation.py: the server cannot decrypt)
        masked = content[m.SECAGG_RECORD][m.SECAGG_VECTOR].numpy()[:-1].astype(float)
        share = -_flat(part).numpy() / total
        assert masked.std() > 2**30
        assert abs(np.corrcoef(masked, share)[0, 1]) < 0.1
    # Each hospital's ledger has the round's one step at (sigma, q).
    for k in range(2):
        ledger = LedgerStore(tmp_path / f"h{k}").load(k, Accountant.rdp)
        (run,) = ledger.runs.values()
        (step,) = run.history
        assert 0 < step[0] <= 1e-12 and step[1:] == (1.0, 1) and run.rounds_trained == [1]


def test_distributed_dp_hospitals_refuse_over_budget_and_in_the_clear(
        tiny_bert, tmp_path, process_identity):
    settings = _distributed_task(tiny_bert, noise_multiplier=0.5, sample_rate=0.5,
                                 threshold=2, target_delta=1e-5, max_epsilon=0.1)
    members = Hospital(task(tiny_bert), list(SPECIALTIES), 0, 2)
    start = trainable_state(members.model)
    _, replies, arrays = _round(settings, tmp_path, start)
    assert arrays is None
    assert {r.error.reason for r in replies} == {
        "4031 privacy-budget-refused key=privacy.distributed_dp.max_epsilon"}
    assert "above its budget 0.1" in (tmp_path / "h0" / "hospital.log").read_text()
    # Without secure aggregation a hospital sends no noisy sum, whatever the server says.
    settings = _distributed_task(tiny_bert, noise_multiplier=0.5, sample_rate=0.5,
                                 threshold=2, target_delta=1e-5)
    grid = ClientAppGrid(tmp_path / "plain")
    strategy = FedAvg(weighted_by_key=m.WEIGHT_KEY, min_available_nodes=2, min_train_nodes=2)
    config = ConfigRecord({m.TASK_KEY: task_settings_to_yaml(settings),
                           m.SECURE_AGGREGATION_ON: True})
    replies = list(grid.send_and_receive(strategy.configure_train(1, ArrayRecord(start),
                                                                  config, grid)))
    assert {r.error.reason for r in replies} == {"4011 stage-refused"}
    assert "only through secure aggregation" in (tmp_path / "plain" / "h0" /
                                                 "hospital.log").read_text()


def test_distributed_dp_rounds_share_one_ledger_entry():
    """Hundreds of one-step rounds: consecutive steps at the same (sigma, q) are one entry,
    so each round's epsilon costs the same; the epsilon is unchanged."""
    from tasks.privacy.accounting import epsilon_spent
    from tasks.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(run_id=1, hospital=0)
    for _ in range(300):
        ledger.add_step((1.2, 0.1, 1))
    assert ledger.history == [(1.2, 0.1, 300)] and ledger.steps == 300
    ledger.add_step((1.5, 0.1, 1))
    assert len(ledger.history) == 2
    for accountant in (Accountant.rdp, Accountant.pld):
        assert epsilon_spent(ledger.history, 1e-5, accountant) == pytest.approx(
            epsilon_spent([(1.2, 0.1, 1)] * 300 + [(1.5, 0.1, 1)], 1e-5, accountant))


@pytest.mark.parametrize("overrides,key", [
    (["privacy=distributed_dp", "secure_aggregation=none"], "secure_aggregation.mode"),
    (["privacy=distributed_dp", "secure_aggregation=ckks", "privacy.dp_sgd.max_grad_norm=2"],
     "privacy.dp_sgd.max_grad_norm"),
    (["privacy=distributed_dp", "secure_aggregation=ckks", "privacy.central_dp.enabled=true"],
     "privacy.mechanism"),
    (["privacy=distributed_dp", "secure_aggregation=ckks", "strategy=fedprox"], "strategy.name"),
    (["privacy=distributed_dp", "secure_aggregation=ckks",
      "privacy.distributed_dp.max_grad_norm=0"], "privacy.distributed_dp.max_grad_norm"),
])
def test_distributed_dp_settings_that_cannot_work_are_refused(overrides, key):
    from clinical_fl.settings.checks import ConfigError
    from clinical_fl.settings.compose import compose_config, to_run_settings

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        to_run_settings(compose_config(overrides))


def test_distributed_dp_in_a_sweep_takes_the_swept_target_and_inf_is_the_level_without_dp():
    from clinical_fl.settings.compose import compose_config, to_run_settings

    def composed(epsilon):
        return to_run_settings(compose_config(["+sweep=epsilon", "privacy=distributed_dp",
                                               f"privacy.dp_sgd.target_epsilon={epsilon}"]))
    three = composed(3)
    assert three.privacy.mechanism.value == "distributed_dp"
    assert three.privacy.distributed_dp.target_epsilon == 3
    assert three.secure_aggregation.mode.value == "secagg_plus"  # the preset picks it
    assert composed("inf").privacy.mechanism.value == "none"


def test_distributed_dp_refuses_a_batch_of_every_record_before_training():
    from clinical_fl.settings.checks import ConfigError
    from clinical_fl.settings.compose import compose_config, task_settings, to_run_settings
    from fl_app.server.preflight import HospitalReport
    from fl_app.server.server_app import Federation, plan_distributed_dp_for

    cfg = compose_config(["privacy=distributed_dp", "secure_aggregation=secagg_plus",
                          "privacy.distributed_dp.expected_batch_size=200"])
    federation = Federation(task=task_settings(cfg, list(SPECIALTIES)), task_config=None,
                            reports=[HospitalReport(1, 0, 90, 10, []),
                                     HospitalReport(2, 1, 90, 10, [])])
    with pytest.raises(ConfigError, match="expected_batch_size=200.*180 training records"):
        plan_distributed_dp_for(to_run_settings(cfg), federation, tracker=None, dimension=1000)


# --- SecAgg+'s lattice (tasks/privacy/lattice.py) ---------------------------------------------

def test_distributed_dp_lattice_rounds_without_bias_and_a_record_moves_levels_boundedly():
    lattice = Lattice(0.5, 2**24)
    rng = np.random.default_rng(0)
    signal = rng.normal(0, 0.01, 50_000)
    levels = lattice.round_signal(signal, np.random.default_rng(1))
    values = levels * lattice.step - 0.5
    assert np.abs(values - signal).max() < lattice.step
    assert abs((values - signal).mean()) < lattice.step / 100  # stochastic: unbiased
    # With the same uniforms (the coupling of the analysis), a record's change of norm r moves
    # the levels by at most r / Delta + sqrt(d).
    change = rng.normal(0, 1, signal.size)
    change *= 1e-4 / np.linalg.norm(change)
    moved = lattice.round_signal(signal + change, np.random.default_rng(1))
    assert np.linalg.norm((moved - levels).astype(float)) <= (
        1e-4 / lattice.step + math.sqrt(signal.size))
    # Beyond [-c, c] the signal is clipped (1-Lipschitz), never wrapped.
    assert list(lattice.round_signal(np.array([-3.0, 3.0]), rng)) == [0, 2**24]


def test_distributed_dp_lattice_shares_with_negative_noise_levels_still_sum_exactly():
    """Levels go modulo 2^32 without clamping: a share beyond the lattice's range wraps, and
    the sum over the hospitals still decodes to the sum of the values (within 256 c)."""
    lattice = Lattice(0.001, 2**24)  # a narrow range: noise of 0.01 leaves it often
    plan = replace(_plan(2.0, 1.0, threshold=3, expected_batch=100), lattice_step=lattice.step)
    signals = [np.random.default_rng(k).normal(0, 1e-4, 10_000) for k in range(3)]
    shares = [lattice_share(s, plan, lattice) for s in signals]
    assert any((sh > 2**31).any() for sh in shares)  # some levels wrapped below zero
    total = sum(sh.astype(np.uint64) for sh in shares) % 2**32
    decoded = dequantize_sum(total, 3, 0.001, 2**24)
    noise = decoded - sum(signals)
    assert noise.std() == pytest.approx(2.0 * 1.0 / 100, rel=0.05)  # sigma C / B in all
