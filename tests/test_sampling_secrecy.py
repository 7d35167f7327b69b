"""DP-SGD's Poisson sampling is secret from the server: the same settings and seed draw other
batches on every call, and what the server knows (the run seed) does not reproduce them.
The plan's step count is the one Opacus takes."""

from __future__ import annotations

import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

from clinical_fl.settings.privacy import DpSgdSettings
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.model.build import trainable_state
from tasks.privacy.ledger import PrivacyLedger
from tasks.privacy.plan import plan_dp_sgd, steps_per_epoch
from tests.support import task


@pytest.fixture
def drawn_batches(monkeypatch):
    """Every batch of record indices Opacus' Poisson sampler yields."""
    batches: list[list[int]] = []
    real_iter = UniformWithReplacementSampler.__iter__

    def recording_iter(self):
        for indices in real_iter(self):
            batches.append(sorted(int(i) for i in indices))
            yield indices

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", recording_iter)
    return batches


def _server_guess(seed: int, records: int, sample_rate: float, steps: int) -> list[list[int]]:
    """What a server that knows the seed computes: Opacus' own draw, torch.rand < q."""
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.nonzero(torch.rand(records, generator=generator) < sample_rate)
                   .flatten().tolist()) for _ in range(steps)]


def test_sampling_secrecy_same_seed_different_batches_and_no_server_reconstruction(
        tiny_bert, drawn_batches):
    settings = task(tiny_bert, "data.notes_per_hospital=60", "train.batch_size=8", "seed=42",
                    "privacy=dp_sgd", "train.local_epochs=1", "privacy.dp_sgd.target_epsilon=null",
                    "privacy.dp_sgd.noise_multiplier=1.0")
    hospital = Hospital(settings, list(SPECIALTIES), 0, 2)
    start = trainable_state(hospital.model)
    draws = []
    for _ in range(2):
        drawn_batches.clear()
        hospital.train(start, server_round=1, ledger=PrivacyLedger(run_id=1, hospital=0))
        draws.append(list(drawn_batches))
    records = len(hospital.data.train)
    plan = hospital.privacy.plan(hospital.settings, 0, records)
    assert len(draws[0]) == len(draws[1]) == plan.steps_per_round
    assert draws[0] != draws[1], "same settings, same seed: the batches must differ"

    # The seed the server knows, as Hospital.train derives it, through both of Opacus'
    # possible generators (the loader's, or torch's global one seeded with it).
    seed = settings.seed * 100_003 + 1 * 1_009 + hospital.data.hospital
    guess = _server_guess(seed, records, plan.sample_rate, plan.steps_per_round)
    for drawn in draws:
        matching = sum(g == d for g, d in zip(guess, drawn, strict=True))
        assert matching < len(drawn) // 2, "the server-known seed reproduces the batches"


def test_the_plans_step_count_is_what_opacus_takes_where_int_one_over_q_is_not_ceil():
    batch = 16
    records = 93 * batch - 1  # ceil(N/B) = 93, but int(1/(1/93)) = 92
    assert int(1 / (1 / 93)) != 93
    rate, steps = steps_per_epoch(records, batch)
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(records)),
                                                           batch_size=batch))
    assert rate == loader.sample_rate and steps == len(loader) == len(list(loader)) == 92
    plan = plan_dp_sgd(DpSgdSettings(noise_multiplier=1.0), 0, records, batch,
                       local_epochs=2, planned_rounds=1)
    assert plan.steps_per_round == 2 * 92 and plan.sample_rate == rate
