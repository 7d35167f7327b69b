"""Distributed DP-SGD's building blocks (issue 16, in progress): the plan's epsilon against an
independent accountant, and a hospital's noisy clipped gradient sum against plain gradients."""

from __future__ import annotations

import math

import pytest
import torch

from settings.task import Accountant, DataSettings, ModelSettings, Pooling
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.learning.batches import make_loader, tokenize
from tasks.model.build import build_model, load_tokenizer
from tasks.privacy.distributed_dp import noisy_clipped_gradient_sum, plan_distributed_dp
from tests.support import independent_epsilon


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


def _plan(noise, clip, threshold=2):
    return plan_distributed_dp(None, 1e-5, 100, 100, 1, clip, threshold,
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


def test_distributed_dp_without_noise_or_clipping_sums_the_plain_gradients(setup):
    model, tokenizer, records = setup
    loader = make_loader(records, tokenizer, len(records), shuffle=False)
    plain = _plain_gradient_sum(model, loader)
    private = noisy_clipped_gradient_sum(model, loader, _plan(0.0, 1e6), poisson_sampling=False)
    assert plain.keys() == private.keys()
    assert sum(g.norm() for g in plain.values()) > 1e-3
    for name in plain:
        torch.testing.assert_close(private[name], plain[name], rtol=1e-4, atol=1e-6)
    # Opacus' hooks were removed: the model trains as before.
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters())


def test_distributed_dp_clips_each_record_and_adds_one_share_of_the_noise(setup):
    model, tokenizer, records = setup
    loader = make_loader(records, tokenizer, len(records), shuffle=False)
    clip, sigma, threshold = 1e-3, 2.0, 4
    quiet = noisy_clipped_gradient_sum(model, loader, _plan(0.0, clip, threshold),
                                       poisson_sampling=False)
    norm = math.sqrt(sum(float(g.square().sum()) for g in quiet.values()))
    assert norm <= clip * len(records) * (1 + 1e-4)  # a sum of clipped records
    noisy = noisy_clipped_gradient_sum(model, loader, _plan(sigma, clip, threshold),
                                       poisson_sampling=False)
    noise = torch.cat([(noisy[n] - quiet[n]).flatten() for n in quiet])
    # Each of t hospitals adds variance (sigma C)^2 / t.
    expected = sigma * clip / math.sqrt(threshold)
    assert noise.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("accountant", [Accountant.rdp])
def test_distributed_dp_epsilon_matches_an_independent_accountant(accountant):
    rounds, delta = 200, 1e-5
    plan = plan_distributed_dp(8.0, delta, total_records=1920, expected_batch=128,
                               planned_rounds=rounds, max_grad_norm=1.0, threshold=3)
    assert plan.sample_rate == pytest.approx(128 / 1920)
    ours = plan.epsilon(rounds, delta, accountant)
    assert ours <= 8.0
    assert ours == pytest.approx(independent_epsilon(
        [(plan.noise_multiplier, plan.sample_rate, rounds)], delta), rel=1e-6)
    # Were only this hospital's share of the noise to protect it: a weaker guarantee.
    fallback = plan.epsilon(rounds, delta, accountant, fallback=True)
    assert fallback == pytest.approx(independent_epsilon(
        [(plan.noise_multiplier / math.sqrt(3), plan.sample_rate, rounds)], delta), rel=1e-6)
    assert fallback > ours


def test_distributed_dp_refuses_a_threshold_of_one():
    with pytest.raises(ValueError, match="threshold of 1"):
        plan_distributed_dp(8.0, 1e-5, 100, 10, 5, 1.0, 1)


def test_distributed_dp_samples_in_secret_and_an_empty_draw_still_sends_its_noise(setup):
    model, tokenizer, records = setup
    loader = make_loader(records, tokenizer, 8, shuffle=False)
    # q = 1e-6: the Poisson draw is empty (all but surely); the share is the noise alone.
    rare = plan_distributed_dp(None, 1e-5, 10**6, 1, 1, 1e-3, 2, noise_multiplier=0.0)
    empty = noisy_clipped_gradient_sum(model, loader, rare)
    assert all(float(g.abs().max()) == 0.0 for g in empty.values())
    rare = plan_distributed_dp(None, 1e-5, 10**6, 1, 1, 1e-3, 2, noise_multiplier=3.0)
    noise = torch.cat([g.flatten() for g in noisy_clipped_gradient_sum(model, loader,
                                                                        rare).values()])
    assert noise.std().item() == pytest.approx(3.0 * 1e-3 / math.sqrt(2), rel=0.05)
    # Half the records on average, drawn from OS entropy: two draws differ.
    half = plan_distributed_dp(None, 1e-5, len(records), len(records) / 2, 1, 1e6, 2,
                               noise_multiplier=0.0)
    first = noisy_clipped_gradient_sum(model, loader, half)
    second = noisy_clipped_gradient_sum(model, loader, half)
    assert any(not torch.equal(first[n], second[n]) for n in first)
