from collections import Counter

from clinical_fl.settings.data import DataSettings
from tasks.data.synthetic_notes import (
    PHI_TYPES,
    SPECIALTIES,
    generate_hospital_notes,
    hospital_case_mix,
    hospital_sizes,
    hospital_style,
)


def test_same_seed_same_notes_other_seed_other_notes():
    a = generate_hospital_notes(0, 20, seed=1)
    b = generate_hospital_notes(0, 20, seed=1)
    c = generate_hospital_notes(0, 20, seed=2)
    assert [n.text for n in a] == [n.text for n in b]
    assert [n.label for n in a] == [n.label for n in b]
    assert [n.text for n in a] != [n.text for n in c]


def test_notes_have_the_sections_of_a_consult():
    note = generate_hospital_notes(0, 1, seed=3)[0]
    style = hospital_style(0, 3)
    for header in style.headers:
        assert (header.upper() if style.uppercase_headers else header) + ": " in note.text


def test_phi_spans_point_at_the_phi_written_into_the_note():
    notes = generate_hospital_notes(1, 200, seed=5)
    seen_types = set()
    for note in notes:
        assert note.phi_spans, "every note carries PHI"
        for start, end, phi_type in note.phi_spans:
            assert phi_type in PHI_TYPES
            assert 0 <= start < end <= len(note.text)
            assert note.text[start:end].strip() == note.text[start:end]
            seen_types.add(phi_type)
    assert seen_types == set(PHI_TYPES)
    # A name span really holds the patient's name as written after "Patient: ".
    first = notes[0]
    start, end, kind = first.phi_spans[0]
    assert kind == "NAME" and first.text.startswith("Patient: " + first.text[start:end])


def test_hospitals_differ_in_style_and_case_mix():
    styles = {hospital_style(h, 42) for h in range(6)}
    assert len(styles) > 1
    mixes = [hospital_case_mix(h, 42, alpha=1.0) for h in range(4)]
    assert all(abs(sum(m) - 1) < 1e-9 for m in mixes)
    dominant = {max(range(len(SPECIALTIES)), key=m.__getitem__) for m in mixes}
    assert len(dominant) > 1, "non-IID: hospitals are dominated by different specialties"
    labels = Counter(n.label for n in generate_hospital_notes(0, 300, seed=42))
    assert len(labels) >= 4


def test_size_skew_keeps_the_mean_and_varies_sizes():
    sizes = hospital_sizes(8, 100, size_skew=0.8, seed=0)
    assert len(set(sizes)) > 1
    assert abs(sum(sizes) / 8 - 100) < 5
    assert hospital_sizes(3, 50, 0.0, 0) == [50, 50, 50]


def test_tfidf_baseline_is_good_but_far_from_perfect():
    from tasks.learning.baseline import tfidf_baseline

    scores = tfidf_baseline(DataSettings(notes_per_hospital=300), num_hospitals=4)
    assert 0.5 < scores["central_accuracy"] < 0.92
    assert 0.5 < scores["hospital_eval_accuracy"] < 0.95
