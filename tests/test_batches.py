"""Length-grouped batches: every record once per epoch, less padding, the same scores; and
never under DP-SGD, whose Poisson batches are what the accountant assumes."""

import pytest
from transformers.trainer_pt_utils import LengthGroupedSampler

from tasks.data.synthetic_notes import SPECIALTIES
from tasks.hospital import Hospital
from tasks.learning.batches import make_loader, token_lengths
from tasks.model.build import trainable_state
from tasks.privacy.ledger import PrivacyLedger
from tests.support import task


def _hospital(tiny_bert, *overrides):
    return Hospital(task(tiny_bert, "model.max_length=256", "data.notes_per_hospital=150",
                         *overrides), list(SPECIALTIES), 0, 2)


def _padded_tokens(loader) -> int:
    return sum(batch["input_ids"].numel() for batch in loader)


def test_grouped_training_batches_hold_every_record_once_and_pad_less(tiny_bert):
    hospital = _hospital(tiny_bert)
    records, tokenizer = hospital.train_records, hospital.tokenizer
    assert len(set(token_lengths(records))) > 5, "notes of many lengths"
    grouped = make_loader(records, tokenizer, 8, shuffle=True, seed=3, group_by_length=True)
    plain = make_loader(records, tokenizer, 8, shuffle=True, seed=3)
    first, second = list(grouped.sampler), list(grouped.sampler)
    assert sorted(first) == sorted(second) == list(range(len(records)))
    assert first != second, "a new order every epoch"
    assert [len(b["labels"]) for b in grouped] == [len(b["labels"]) for b in plain]
    assert _padded_tokens(grouped) < 0.97 * _padded_tokens(plain)


def test_grouped_evaluation_reads_longest_first_and_scores_the_same(tiny_bert):
    hospital = _hospital(tiny_bert, "train.eval_batch_size=8")
    loader = make_loader(hospital.eval_records, hospital.tokenizer, 8, shuffle=False,
                         group_by_length=True)
    widths = [batch["input_ids"].shape[1] for batch in loader]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    state = trainable_state(hospital.model)
    grouped = hospital.evaluate(state)
    plain = _hospital(tiny_bert, "train.eval_batch_size=8",
                      "train.group_by_length=false").evaluate(state)
    assert grouped.accuracy == plain.accuracy and grouped.true_positives == plain.true_positives
    assert abs(grouped.loss - plain.loss) < 1e-4


def test_dp_sgd_is_handed_ungrouped_records(tiny_bert, monkeypatch):
    """Opacus replaces the sampler with Poisson sampling anyway; the hospital does not even
    offer it a grouped one."""
    hospital = _hospital(tiny_bert, "privacy=dp_sgd", "privacy.dp_sgd.target_epsilon=8")
    assert hospital.settings.train.group_by_length

    class Handed(Exception):
        pass

    def capture(model, loader, *args, **kwargs):
        raise Handed(loader)

    monkeypatch.setattr("tasks.privacy.mechanisms.dp_sgd.train_with_dp_sgd", capture)
    with pytest.raises(Handed) as caught:
        hospital.train(trainable_state(hospital.model), 1, ledger=PrivacyLedger(1, 0))
    assert not isinstance(caught.value.args[0].sampler, LengthGroupedSampler)
