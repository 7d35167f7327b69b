"""DP-SGD in a hospital: it must compute the same LoRA update as plain training when its
noise is off and clipping cannot bite, must clip every record, and must add noise."""

from __future__ import annotations

import pytest
import torch

from clinical_fl.settings.data import DataSettings
from clinical_fl.settings.model import ModelSettings, Pooling
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import OptimizerName, TrainSettings
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.learning.batches import make_loader, tokenize
from tasks.learning.training import train_locally
from tasks.model.build import build_model, load_tokenizer, load_trainable_state, trainable_state
from tasks.model.compute import CPU_FP32, Compute
from tasks.privacy.dp_sgd import train_with_dp_sgd

# bf16 autocast runs on any CPU (emulated where it is not native): the arithmetic is the same.
BF16 = Compute(torch.device("cpu"), True, "test: bf16 autocast")


@pytest.fixture(scope="module", params=["bert", "bert-mean-pooling", "gpt2"])
def setup(request, tiny_bert, tiny_gpt2):
    path = tiny_gpt2 if request.param == "gpt2" else tiny_bert
    pooling = Pooling.mean if request.param == "bert-mean-pooling" else Pooling.model
    settings = ModelSettings(name_or_path=str(path), max_length=64, pooling=pooling)
    tokenizer = load_tokenizer(settings)
    model = build_model(settings, list(SPECIALTIES), 0, tokenizer)
    for module in model.modules():  # LoRA's and the base model's: two runs must see the same
        if isinstance(module, torch.nn.Dropout):  # forward pass
            module.p = 0.0
    data = load_hospital_data(DataSettings(notes_per_hospital=40), list(SPECIALTIES), 0, 2)
    records = tokenize(data.train, tokenizer, 64)
    return model, tokenizer, records, trainable_state(model)


def _delta(model, start):
    return {k: v - start[k] for k, v in trainable_state(model).items()}


def _flat(update):
    return torch.cat([v.flatten() for v in update.values()])


def test_dp_sgd_without_noise_or_clipping_reproduces_the_plain_lora_update(setup):
    model, tokenizer, records, start = setup
    settings = TrainSettings(learning_rate=1e-2, local_epochs=2, max_grad_norm=0.0)

    load_trainable_state(model, start)
    train_locally(model, make_loader(records, tokenizer, 8, shuffle=False), settings)
    plain = _delta(model, start)

    for mode in (GradSampleMode.hooks, GradSampleMode.ghost):
        load_trainable_state(model, start)
        history = []
        train_with_dp_sgd(model, make_loader(records, tokenizer, 8, shuffle=False), settings,
                          noise_multiplier=0.0, max_grad_norm=1e6, grad_sample_mode=mode,
                          history=history, poisson_sampling=False)
        private = _delta(model, start)
        assert plain.keys() == private.keys()
        assert _flat(plain).norm() > 1e-3, "the update is not trivially zero"
        for key in plain:
            torch.testing.assert_close(private[key], plain[key], rtol=1e-3, atol=2e-5,
                                       msg=lambda m, k=key, mode=mode: f"{mode.value} {k}: {m}")

    load_trainable_state(model, start)
    train_with_dp_sgd(model, make_loader(records, tokenizer, 8, shuffle=False), settings,
                      noise_multiplier=1.0, max_grad_norm=1e6,
                      grad_sample_mode=GradSampleMode.hooks, history=[],
                      poisson_sampling=False)
    noisy = _delta(model, start)
    assert (_flat(noisy) - _flat(plain)).norm() > 0.1 * _flat(plain).norm()


def _one_pass(setup, records, settings, private, compute=CPU_FP32):
    """The update of one pass over ``records`` (batches of 8, in order) from the start state:
    plain training, or DP-SGD without noise, without sampling and with clipping that never
    bites (it must then equal plain training)."""
    model, tokenizer, _, start = setup
    load_trainable_state(model, start)
    loader = make_loader(records, tokenizer, 8, shuffle=False)
    if private:
        train_with_dp_sgd(model, loader, settings, noise_multiplier=0.0, max_grad_norm=1e6,
                          grad_sample_mode=GradSampleMode.hooks, history=[],
                          poisson_sampling=False, compute=compute)
    else:
        train_locally(model, loader, settings, compute=compute)
    return _delta(model, start)


def test_the_head_can_have_its_own_learning_rate(setup):
    """One SGD step: the head moves by head_learning_rate x its gradient, the LoRA matrices
    by learning_rate x theirs, in plain training and under DP-SGD alike."""
    subset = setup[2].select(range(8))

    def one_step(settings, private):
        return _one_pass(setup, subset, settings, private)

    for private in (False, True):
        base = dict(optimizer=OptimizerName.sgd, learning_rate=0.01, max_grad_norm=0.0,
                    head_learning_rate=None)
        same = one_step(TrainSettings(**base), private)
        split = one_step(TrainSettings(**(base | {"head_learning_rate": 0.5})), private)
        lora = [k for k in same if "lora_" in k]
        head = [k for k in same if "lora_" not in k]
        assert lora and head
        assert _flat({k: same[k] for k in head}).norm() > 0
        for key in lora:
            torch.testing.assert_close(split[key], same[key], rtol=1e-4, atol=1e-8)
        for key in head:
            torch.testing.assert_close(split[key], same[key] * 50, rtol=1e-3, atol=1e-7)


def test_dp_sgd_in_bf16_reproduces_the_plain_bf16_update(setup):
    """The equivalence above under bf16 autocast: per-record gradients from bf16 activations,
    cast to float32, summed, must give plain bf16 training's update (bf16's tolerance), and
    that update must be close to float32's. SGD: the update is the gradient (Adam would
    magnify bf16's rounding in coordinates whose gradients are near zero)."""
    settings = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=0.1, local_epochs=1,
                             max_grad_norm=0.0)

    def update(private, compute):
        return _flat(_one_pass(setup, setup[2], settings, private, compute))

    plain, private, fp32 = update(False, BF16), update(True, BF16), update(False, CPU_FP32)
    assert plain.norm() > 1e-3
    # Measured: 0.2-0.3% in both comparisons on the three tiny models.
    assert (private - plain).norm() < 0.01 * plain.norm()
    assert (plain - fp32).norm() < 0.02 * fp32.norm()


@pytest.mark.parametrize("compute", [CPU_FP32, BF16], ids=["fp32", "bf16"])
def test_every_record_contributes_at_most_the_clipping_norm(setup, compute):
    """In both precisions: under bf16 the norms and clipping factors are float32, so the
    bound holds to float32's rounding, not bf16's."""
    model, tokenizer, records, start = setup
    clip = 1e-3  # far below the natural per-record gradient norm
    # The head at the same rate: the update is exactly the clipped gradient, head included.
    settings = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=1.0, local_epochs=1,
                             head_learning_rate=None)

    def update(indices, unclipped=False):
        load_trainable_state(model, start)
        subset = records.select(indices)
        # Batch = all given records; expected batch size = len(indices), so with SGD at
        # learning rate 1 the update is minus the mean of the clipped gradients.
        train_with_dp_sgd(model, make_loader(subset, tokenizer, len(indices), shuffle=False),
                          settings, noise_multiplier=0.0,
                          max_grad_norm=1e6 if unclipped else clip,
                          grad_sample_mode=GradSampleMode.hooks, history=[],
                          poisson_sampling=False, compute=compute)
        return _flat(_delta(model, start))

    singles = [update([i]) for i in range(6)]
    for i, single in enumerate(singles):
        assert single.norm() <= clip * (1 + 1e-4), f"record {i}: {single.norm()} > {clip}"
        assert update([i], unclipped=True).norm() > 10 * clip, "clipping did bite"
    together = update(list(range(6)))
    # bf16: a record's gradient depends a little on the padding of the batch it is in.
    rtol = 1e-3 if compute is CPU_FP32 else 3e-2
    torch.testing.assert_close(together * 6, sum(singles), rtol=rtol, atol=rtol * clip / 10)


def test_the_accountant_hook_records_every_step(setup):
    model, tokenizer, records, start = setup
    load_trainable_state(model, start)
    history = [(2.0, 0.5, 3)]
    outcome = train_with_dp_sgd(model, make_loader(records, tokenizer, 8, shuffle=True, seed=1),
                                TrainSettings(local_epochs=2), noise_multiplier=1.5,
                                max_grad_norm=1.0, grad_sample_mode=GradSampleMode.hooks,
                                history=history)
    batches = -(-len(records) // 8)
    assert outcome.num_steps == 2 * batches
    assert history == [(2.0, 0.5, 3), (1.5, 1 / batches, 2 * batches)]
    assert not any(hasattr(p, "grad_sample") for p in model.parameters()), "hooks removed"


@pytest.mark.parametrize("mode", [GradSampleMode.hooks, GradSampleMode.ghost])
def test_an_empty_poisson_batch_takes_a_noise_only_step(setup, mode):
    """Secret sampling makes empty batches possible in any run ((1-q)^N per step): here 2
    records at rate 1/2, so about one step in four draws none. Each still adds noise and
    counts in the accountant; none crashes the model."""
    model, tokenizer, records, start = setup
    load_trainable_state(model, start)
    history = []
    outcome = train_with_dp_sgd(model, make_loader(records.select(range(2)), tokenizer, 1,
                                                   shuffle=True), TrainSettings(local_epochs=20),
                                noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                                history=history)
    assert outcome.num_steps == 40 and history == [(1.0, 0.5, 40)]
    assert all(torch.isfinite(v).all() for v in trainable_state(model).values())
