"""What the DP-SGD optimizer computes is the mechanism the accountant composes (issue 33, 4).

The accountant books each step as the sampled Gaussian mechanism at (q, sigma): a Poisson
batch at rate q, each note's gradient clipped to C, the clipped sum released with Gaussian
noise of standard deviation sigma x C. Opacus 1.6 then divides the noisy sum by the *expected*
batch size B = int(N x q), a constant (post-processing), never by the batch actually drawn,
which would make the release a data-dependent normalisation outside that analysis. These tests
hold the product's real step (``tasks/privacy/dp_sgd.py::train_with_dp_sgd``, secret Poisson
sampling on) to that: the update is the clipped sum over the drawn notes divided by B, and its
noise has standard deviation sigma x C / B per step. Empty batches and notes of several
windows are held to it in tests/test_dp_sgd.py and tests/test_long_notes.py.
"""

from __future__ import annotations

import pytest
import torch

from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import ModelSettings
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import OptimizerName, TrainSettings
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.learning.batches import make_loader, tokenize
from tasks.model.build import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.privacy import dp_sgd
from tasks.privacy.dp_sgd import train_with_dp_sgd

NOTES, LOADER_BATCH = 8, 4  # q = 1/2: two Poisson batches an epoch, expected batch B = 4
CLIP = 1e-3  # far below a note's natural gradient norm: every note is clipped to exactly C


@pytest.fixture(scope="module")
def one_note_eight_times(tiny_bert):
    """Eight copies of one note: every drawn note has the same clipped gradient, so the update
    says how many were drawn and what they were divided by."""
    settings = ModelSettings(name_or_path=str(tiny_bert), max_length=64)
    tokenizer = load_tokenizer(settings)
    model = build_model(settings, list(SPECIALTIES), 0, tokenizer)
    for module in model.modules():  # the same forward pass for every copy and every step
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = load_hospital_data(DataSettings(notes_per_hospital=40), list(SPECIALTIES), 0, 2)
    records = tokenize(data.train, tokenizer, 64).select([0] * NOTES)
    return model, tokenizer, records, trainable_state(model)


def _sgd(learning_rate: float) -> TrainSettings:
    return TrainSettings(optimizer=OptimizerName.sgd, learning_rate=learning_rate,
                         head_learning_rate=None, local_epochs=1)


def _update(model, start) -> torch.Tensor:
    return torch.cat([(v - start[k]).flatten() for k, v in trainable_state(model).items()])


def _train(model, tokenizer, records, settings, noise, *, poisson=True, batch=LOADER_BATCH):
    history: list = []
    train_with_dp_sgd(model, make_loader(records, tokenizer, batch, shuffle=False), settings,
                      noise_multiplier=noise, max_grad_norm=CLIP,
                      grad_sample_mode=GradSampleMode.hooks, history=history,
                      poisson_sampling=poisson)
    return history


def test_accounted_mechanism_the_update_is_the_clipped_sum_over_the_expected_batch(
        one_note_eight_times, monkeypatch):
    model, tokenizer, records, start = one_note_eight_times
    lr = 0.1  # small steps: the second step's gradient is the first's to within 1e-3
    load_trainable_state(model, start)
    _train(model, tokenizer, records.select([0]), _sgd(lr), 0.0, poisson=False, batch=1)
    one_note = _update(model, start)  # -lr x the note's clipped gradient (B = 1)
    assert one_note.norm() == pytest.approx(lr * CLIP, rel=1e-3)

    drawn: list[int] = []
    step = dp_sgd._private_step

    def counting(model, private, batch, *args):
        drawn.append(int(batch["labels"].shape[0]))
        return step(model, private, batch, *args)

    monkeypatch.setattr(dp_sgd, "_private_step", counting)
    for _ in range(4):  # four epochs of secret Poisson draws
        drawn.clear()
        load_trainable_state(model, start)
        history = _train(model, tokenizer, records, _sgd(lr), 0.0)
        assert history == [(0.0, 1 / 2, 2)], "booked: two steps at q = 1/2"
        expected_batch = int(NOTES * history[0][1])
        predicted = sum(drawn) / expected_batch * one_note
        # One note more or less, or a division by the batch drawn, is off by lr C / 4 or more;
        # float32 rounding of the parameters is about lr C / 1,000.
        assert (_update(model, start) - predicted).norm() <= 1e-2 * lr * CLIP, drawn


def test_accounted_mechanism_the_noise_is_sigma_c_over_the_expected_batch_per_step(
        one_note_eight_times):
    model, tokenizer, records, start = one_note_eight_times
    sigma = 100.0  # the clipped signal (at most 8 C in all) is lost in noise of sigma C
    load_trainable_state(model, start)
    history = _train(model, tokenizer, records, _sgd(1.0), sigma)
    steps, expected_batch = history[0][2], int(NOTES * history[0][1])
    update = _update(model, start)
    # Each coordinate: the sum of `steps` independent N(0, (sigma C / B)^2) draws.
    predicted = sigma * CLIP / expected_batch * steps ** 0.5
    assert update.numel() > 4_000  # the spread of the estimate is about 1 / sqrt(2 n)
    assert update.std().item() == pytest.approx(predicted, rel=0.05)
