"""Whole notes in windows (model.long_notes=chunk): reading, pooling, and per-note clipping."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
import torch

from clinical_fl.settings.compose import ConfigError, compose_config, task_settings
from clinical_fl.settings.model import LongNotes, ModelSettings, WindowPooling
from clinical_fl.settings.privacy import GradSampleMode
from clinical_fl.settings.train import OptimizerName, TrainSettings
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.errors import ModelNotFoundError, TaskInputError
from tasks.learning.batches import chunking_for, make_loader, tokenize
from tasks.learning.evaluation import predict_labels
from tasks.learning.passes import split_passes
from tasks.learning.training import train_locally
from tasks.model.build import (
    build_model,
    load_adapter,
    load_tokenizer,
    load_trainable_state,
    save_adapter,
    trainable_state,
)
from tasks.model.windows import WINDOW_ATTENTION, WINDOW_NOTE
from tasks.privacy.dp_sgd import train_with_dp_sgd

LABELS = list(SPECIALTIES)
WINDOW = 16  # tokens, so that a note of ~70 words spans several windows
LONG = ("Patient reports crushing chest pain radiating to the left arm for two days with "
        "sweating and nausea, worse on exertion and relieved by rest; troponin is mildly "
        "elevated and the ECG shows ST depression in the lateral leads, so the plan is an "
        "echocardiogram, a stress test and a beta blocker, with follow up in one week.")
SHORT = "Knee pain after a fall."


@pytest.fixture(params=[WindowPooling.mean, WindowPooling.max, WindowPooling.attention])
def pooled(tiny_bert, request):
    """The chunked model below, with each way of pooling windows."""
    return _chunked(tiny_bert, request.param)


@pytest.fixture
def chunked(tiny_bert):
    return _chunked(tiny_bert, WindowPooling.mean)


def _chunked(tiny_bert, pooling: WindowPooling):
    settings = ModelSettings(name_or_path=str(tiny_bert), max_length=WINDOW, chunk_stride=4,
                             window_pooling=pooling)
    model = build_model(settings, LABELS, seed=0)
    for module in model.modules():  # two runs must see the same forward pass
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    generator = torch.Generator().manual_seed(3)  # a head that is not near zero
    load_trainable_state(model, {k: v + 0.2 * torch.randn(v.shape, generator=generator)
                                 for k, v in trainable_state(model).items()})
    return settings, model, load_tokenizer(settings)


def _records(tokenizer, settings: ModelSettings, texts: list[str]) -> datasets.Dataset:
    rows = datasets.Dataset.from_dict({"text": texts, "label": list(range(len(texts)))})
    return tokenize(rows, tokenizer, settings.max_length, chunking_for(settings))


def _update(model, start: dict[str, torch.Tensor]) -> torch.Tensor:
    now = trainable_state(model)
    return torch.cat([(now[k] - start[k]).flatten() for k in start])


def test_a_long_note_is_read_in_overlapping_windows_and_a_short_one_like_truncation(chunked):
    settings, model, tokenizer = chunked
    records = _records(tokenizer, settings, [LONG, SHORT])
    windows = records["input_ids"]
    assert len(windows[0]) >= 5 and len(windows[1]) == 1
    assert all(len(w) <= WINDOW for w in windows[0])
    # Consecutive windows share chunk_stride tokens of text.
    assert windows[0][0][-1 - 4:-1] == windows[0][1][1:1 + 4]
    truncated = tokenize(datasets.Dataset.from_dict({"text": [SHORT], "label": [0]}),
                         tokenizer, WINDOW)
    model.eval()
    with torch.no_grad():
        chunk_batch = next(iter(make_loader(records.select([1]), tokenizer, 1, shuffle=False)))
        plain_batch = next(iter(make_loader(truncated, tokenizer, 1, shuffle=False)))
        torch.testing.assert_close(model(**chunk_batch).logits, model(**plain_batch).logits)
        # The long note: one vector per note, the mean of its windows' vectors.
        both = next(iter(make_loader(records, tokenizer, 2, shuffle=False)))
        assert model(**both).logits.shape == (2, len(LABELS))


@pytest.mark.parametrize("mode", [GradSampleMode.hooks, GradSampleMode.functorch])
def test_per_note_clipping_bounds_a_five_window_note_and_a_one_window_note_alike(pooled, mode):
    """With noise 0, one note's DP-SGD step moves the adapter by at most the clipping norm:
    its windows are clipped together as one record, however many there are."""
    settings, model, tokenizer = pooled
    records = _records(tokenizer, settings, [LONG, SHORT])
    # One rate for all parameters, so the step is the clipped gradient itself.
    sgd = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=1.0, batch_size=1,
                        head_learning_rate=None)
    start = trainable_state(model)

    def step(index: int, clip: float) -> float:
        load_trainable_state(model, start)
        loader = make_loader(records.select([index]), tokenizer, 1, shuffle=False)
        train_with_dp_sgd(model, loader, sgd, noise_multiplier=0.0, max_grad_norm=clip,
                          grad_sample_mode=mode, history=[], poisson_sampling=False)
        return float(_update(model, start).norm())

    for index in (0, 1):
        own = step(index, 1e6)  # the note's own gradient norm (nothing clipped)
        clip = own / 4  # clipping binds: a per-window clip would let 5 windows reach 5x
        moved = step(index, clip)
        assert clip * 0.999 <= moved <= clip * (1 + 1e-4), (mode, index, own, moved)
    assert len(records[0]["input_ids"]) >= 5


@pytest.mark.parametrize("windows_per_pass", [None, 1])
def test_per_note_clipping_keeps_each_notes_own_gradient_when_nothing_is_clipped(
        pooled, windows_per_pass):
    """Without clipping or noise, DP-SGD's step on notes of 5 and 1 windows is the plain SGD
    step: the windows' per-sample gradients are summed and rescaled exactly, whether the batch
    is read in one pass or a pass per note (the passes' rows joined into one batch: one step,
    the batch's sampling rate)."""
    settings, model, tokenizer = pooled
    records = _records(tokenizer, settings, [LONG, SHORT, SHORT + " " + SHORT])
    sgd = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=1.0, batch_size=3,
                        max_grad_norm=0.0, windows_per_pass=windows_per_pass)
    start = trainable_state(model)
    train_locally(model, make_loader(records, tokenizer, 3, shuffle=False), sgd)
    plain = _update(model, start)
    for mode in (GradSampleMode.hooks, GradSampleMode.functorch):
        load_trainable_state(model, start)
        history = []
        train_with_dp_sgd(model, make_loader(records, tokenizer, 3, shuffle=False), sgd,
                          noise_multiplier=0.0, max_grad_norm=1e6, grad_sample_mode=mode,
                          history=history, poisson_sampling=False)
        private = _update(model, start)
        assert plain.norm() > 1e-3
        torch.testing.assert_close(private, plain, rtol=1e-4, atol=1e-6, msg=mode.value)
        assert [step[2] for step in history] == [1] and history[0][1] == 1.0, history


def test_per_note_clipping_refuses_ghost_clipping_of_several_windows(chunked):
    settings, model, tokenizer = chunked
    records = _records(tokenizer, settings, [LONG])
    with pytest.raises(TaskInputError, match="ghost clips per window"):
        train_with_dp_sgd(model, make_loader(records, tokenizer, 1, shuffle=False),
                          TrainSettings(), noise_multiplier=0.0, max_grad_norm=1.0,
                          grad_sample_mode=GradSampleMode.ghost, history=[],
                          poisson_sampling=False)
    with pytest.raises(ConfigError, match="ghost"):
        task_settings(compose_config(["privacy=dp_sgd", "privacy.dp_sgd.grad_sample_mode=ghost"]),
                      LABELS)
    task_settings(compose_config(["privacy=dp_sgd", "privacy.dp_sgd.grad_sample_mode=ghost",
                                  "model.long_notes=truncate"]), LABELS)


def test_notes_beyond_max_chunks_are_cut_and_counted(chunked, caplog):
    settings, _, tokenizer = chunked
    capped = ModelSettings(name_or_path=settings.name_or_path, max_length=WINDOW,
                           chunk_stride=4, max_chunks=2)
    with caplog.at_level(logging.WARNING):
        records = _records(tokenizer, capped, [LONG, SHORT])
    assert len(records[0]["input_ids"]) == 2
    assert "1 of 2 notes are longer than 2 windows" in caplog.text


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.max_chunks=0"], "model.max_chunks"),
    (["model.max_length=64", "model.chunk_stride=62"], "model.chunk_stride"),
    (["model.long_notes=sometimes"], "model.long_notes"),
])
def test_bad_window_settings_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_a_window_longer_than_the_models_positions_is_refused(tiny_bert):
    with pytest.raises(ModelNotFoundError, match="256 positions"):
        build_model(ModelSettings(name_or_path=str(tiny_bert), max_length=512), LABELS, 0)


def test_chunk_is_the_default_and_truncate_reads_the_window_only(tiny_bert):
    assert ModelSettings().long_notes == LongNotes.chunk
    settings = ModelSettings(name_or_path=str(tiny_bert), max_length=WINDOW,
                             long_notes=LongNotes.truncate)
    records = _records(load_tokenizer(settings), settings, [LONG])
    assert len(records[0]["input_ids"]) == WINDOW  # one flat window


def test_passes_hold_whole_notes_and_trim_their_own_padding():
    # Notes of 1, 3, 5, 1 and 2 windows, at most 4 windows a pass.
    counts = [1, 3, 5, 1, 2]
    owner = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    width = torch.tensor([3, 6, 6, 2, 6, 6, 6, 6, 4, 2, 6, 1])  # real tokens per window
    mask = (torch.arange(8).unsqueeze(0) < width.unsqueeze(1)).long()
    batch = {"input_ids": torch.arange(12 * 8).view(12, 8) * mask, "attention_mask": mask,
             WINDOW_NOTE: owner, "labels": torch.tensor([0, 1, 2, 3, 4])}
    parts = list(split_passes(batch, 4))
    assert [notes for _, notes in parts] == [2, 1, 2]
    assert [p["labels"].tolist() for p, _ in parts] == [[0, 1], [2], [3, 4]]
    assert [p[WINDOW_NOTE].tolist() for p, _ in parts] == [[0, 1, 1, 1], [0] * 5, [0, 1, 1]]
    assert [p["input_ids"].shape[1] for p, _ in parts] == [6, 6, 6]
    assert torch.equal(torch.cat([p["input_ids"][:, :6] for p, _ in parts]),
                       batch["input_ids"][:, :6])
    assert list(split_passes(batch, 12))[0][0] is batch  # fits: the batch itself
    short = {"input_ids": torch.ones(3, 8, dtype=torch.long), "labels": torch.arange(3),
             "attention_mask": torch.tensor([[1] * 2 + [0] * 6, [1] * 5 + [0] * 3, [1] * 8])}
    assert [p["input_ids"].shape[1] for p, _ in split_passes(short, 2)] == [5, 8]


@pytest.mark.parametrize("reading", [LongNotes.chunk, LongNotes.truncate])
def test_training_and_evaluation_in_passes_equal_one_pass_of_the_batch(chunked, reading):
    settings, model, tokenizer = chunked
    settings = ModelSettings(name_or_path=settings.name_or_path, max_length=WINDOW,
                             chunk_stride=4, long_notes=reading)
    records = _records(tokenizer, settings, [LONG, SHORT, LONG[:120], SHORT + " " + SHORT])
    start = trainable_state(model)
    updates = []
    for cap in (1, 2, 1000):
        load_trainable_state(model, start)
        sgd = TrainSettings(optimizer=OptimizerName.sgd, learning_rate=1.0, batch_size=4,
                            max_grad_norm=0.5, windows_per_pass=cap)
        train_locally(model, make_loader(records, tokenizer, 4, shuffle=False), sgd,
                      proximal_mu=0.1)
        updates.append(_update(model, start))
    assert updates[-1].norm() > 1e-3
    for update in updates[:-1]:
        torch.testing.assert_close(update, updates[-1], rtol=1e-4, atol=1e-6)
    # Evaluation reads at most as many windows a pass as the loader's batch has notes.
    loader = make_loader(records, tokenizer, 4, shuffle=False)
    whole = next(iter(loader))
    assert len(whole["input_ids"]) > 4 or reading == LongNotes.truncate
    _, predicted, loss = predict_labels(model, loader)
    with torch.inference_mode():
        logits = model(**{k: v for k, v in whole.items() if k != "labels"}).logits
    assert predicted == logits.argmax(-1).tolist()
    expected = torch.nn.functional.cross_entropy(logits, whole["labels"], reduction="sum")
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_windows_per_pass_is_checked():
    with pytest.raises(ConfigError, match="train.windows_per_pass"):
        compose_config(["train.windows_per_pass=0"])
    assert TrainSettings().pass_cap("cpu") == 8 and TrainSettings().pass_cap("cuda") is None


def test_attention_pooling_starts_as_the_mean_learns_window_weights_and_is_saved(tiny_bert,
                                                                              tmp_path):
    def model_for(pooling: WindowPooling):
        settings = ModelSettings(name_or_path=str(tiny_bert), max_length=WINDOW,
                                 chunk_stride=4, window_pooling=pooling)
        return settings, build_model(settings, LABELS, seed=0).eval()

    settings, attention = model_for(WindowPooling.attention)
    _, mean = model_for(WindowPooling.mean)
    tokenizer = load_tokenizer(settings)
    batch = next(iter(make_loader(_records(tokenizer, settings, [LONG, SHORT]), tokenizer, 2,
                                  shuffle=False)))
    scorer = {k: v for k, v in trainable_state(attention).items() if WINDOW_ATTENTION in k}
    assert len(scorer) == 2 and all(not v.any() for v in scorer.values())
    assert trainable_state(mean).keys() == trainable_state(attention).keys() - scorer.keys()
    with torch.no_grad():
        torch.testing.assert_close(attention(**batch).logits, mean(**batch).logits)
        load_trainable_state(attention, {**trainable_state(attention), **{
            k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
            for k, v in scorer.items()}})
        weighed = attention(**batch).logits
        assert not torch.allclose(weighed[0], mean(**batch).logits[0])  # 5 windows weighed
        torch.testing.assert_close(weighed[1], mean(**batch).logits[1])  # one window: itself
        save_adapter(attention, tmp_path / "adapter", settings, LABELS)
        loaded, *_ = load_adapter(tmp_path / "adapter")
        torch.testing.assert_close(loaded(**batch).logits, weighed)
    with pytest.raises(ConfigError, match="model.window_pooling"):
        compose_config(["model.window_pooling=attention", "model.long_notes=truncate"])


@pytest.mark.parametrize("reading", ["mean", "max", "attention", "first-window"])
def test_each_pooling_of_windows_trains_evaluates_predicts_and_runs_the_encrypted_head(
        tiny_bert, tmp_path, reading):
    """Every way of making one vector of a note's windows (and the first window alone, which
    is model.long_notes=truncate) goes through the whole path: a training step moves the
    adapter, evaluation scores the notes, the saved adapter predicts what the trained model
    predicts, and the CKKS head gives the plaintext head's logits on the vectors it pools."""
    from clinical_fl.serving.ckks_head import ClientKeys, EncryptedHead
    from tasks.model.predict import NoteClassifier

    first = reading == "first-window"
    settings = ModelSettings(
        name_or_path=str(tiny_bert), max_length=WINDOW, chunk_stride=4,
        long_notes=LongNotes.truncate if first else LongNotes.chunk,
        window_pooling=WindowPooling.mean if first else WindowPooling(reading))
    model = build_model(settings, LABELS, seed=0)
    tokenizer = load_tokenizer(settings)
    texts = [LONG, SHORT, LONG[:150], SHORT + " " + LONG[100:]]
    records = _records(tokenizer, settings, texts)
    assert first or len(records[0]["input_ids"]) >= 5
    start = trainable_state(model)
    train_locally(model, make_loader(records, tokenizer, 2, shuffle=True),
                  TrainSettings(learning_rate=5e-2, batch_size=2))
    assert _update(model, start).norm() > 1e-3
    _, predicted, loss = predict_labels(model.eval(), make_loader(records, tokenizer, 4,
                                                                  shuffle=False))
    assert len(predicted) == len(texts) and loss > 0
    save_adapter(model, tmp_path / "adapter", settings, LABELS)
    classifier = NoteClassifier(tmp_path / "adapter")
    logits = classifier.logits(texts)
    assert logits.argmax(-1).tolist() == predicted
    vectors = classifier.vectors(texts)
    weight, bias = classifier.head()
    np.testing.assert_allclose(vectors @ weight + bias, logits, atol=1e-4)
    head = EncryptedHead(weight, bias)
    keys = ClientKeys(head.layout)
    answer = head.evaluate(keys.encrypt(vectors), head.load_keys(keys.evaluation_keys))
    np.testing.assert_allclose(keys.decrypt(answer, len(texts)), logits, atol=1e-3)


def test_max_pooling_takes_each_features_largest_window_value(chunked, tiny_bert):
    """The head reads, feature by feature, the largest value over the note's windows."""
    settings, _, tokenizer = chunked
    maxed = ModelSettings(name_or_path=str(tiny_bert), max_length=WINDOW, chunk_stride=4,
                          window_pooling=WindowPooling.max)
    model = build_model(maxed, LABELS, seed=0).eval()
    batch = next(iter(make_loader(_records(tokenizer, maxed, [LONG, SHORT]), tokenizer, 2,
                                  shuffle=False)))
    seen = {}
    head = model.base_model.model.classifier.modules_to_save["default"]
    handle = head.register_forward_hook(lambda _m, args, _o: seen.update(pooled=args[0]))
    windows = {}
    encoder_pooler = model.base_model.model.bert.pooler
    hook = encoder_pooler.register_forward_hook(lambda _m, _a, out: windows.update(v=out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    hook.remove()
    owner = batch[WINDOW_NOTE]
    expected = torch.stack([windows["v"][owner == note].max(dim=0).values for note in (0, 1)])
    torch.testing.assert_close(seen["pooled"], expected)
