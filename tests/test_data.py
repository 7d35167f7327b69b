import pytest

from clinical_fl.settings.data import DataSettings, Partitioning
from tasks.data.hospital_data import load_hospital_data, load_server_test_set, source_labels
from tasks.data.synthetic_notes import SPECIALTIES
from tasks.errors import HospitalDataError


def test_each_hospital_gets_its_own_notes_and_an_eval_split():
    settings = DataSettings(notes_per_hospital=50, eval_fraction=0.2)
    labels = source_labels(settings)
    parts = [load_hospital_data(settings, labels, k, 3) for k in range(3)]
    for k, part in enumerate(parts):
        assert len(part.train) == 40 and len(part.eval) == 10
        assert set(part.train["site"]) == {f"{k:05d}"}
        assert set(part.train["label"]) <= set(range(len(labels)))
    texts = [set(p.train["text"]) for p in parts]
    assert not texts[0] & texts[1]


def test_iid_partitioning_deals_the_pooled_notes_evenly():
    settings = DataSettings(notes_per_hospital=40, partitioning=Partitioning.iid)
    labels = source_labels(settings)
    parts = [load_hospital_data(settings, labels, k, 2) for k in range(2)]
    assert [len(p.train) + len(p.eval) for p in parts] == [40, 40]
    assert len(set(parts[0].train["site"])) == 2, "IID mixes the sites"


def test_empty_partition_names_the_hospital():
    settings = DataSettings(notes_per_hospital=0)
    with pytest.raises(HospitalDataError, match=r"hospital 1 .*partition is empty"):
        load_hospital_data(settings, list(SPECIALTIES), 1, 2)


def test_label_outside_the_global_set_names_hospital_row_and_label():
    settings = DataSettings(notes_per_hospital=30)
    with pytest.raises(HospitalDataError,
                       match=r"hospital 0 .*row \d+: label '\w+' is not in the global label set"):
        load_hospital_data(settings, ["cardiology", "neurology"], 0, 2)


def test_partition_id_out_of_range():
    with pytest.raises(HospitalDataError, match="partition-id must lie in"):
        load_hospital_data(DataSettings(), list(SPECIALTIES), 2, 2)


def test_server_test_set_is_separate_and_can_be_turned_off():
    settings = DataSettings(server_test_notes=30)
    test = load_server_test_set(settings, list(SPECIALTIES))
    assert len(test) == 30
    hospital = load_hospital_data(settings, list(SPECIALTIES), 0, 2)
    assert not set(test["text"]) & set(hospital.train["text"])
    settings.server_test_notes = 0
    assert load_server_test_set(settings, list(SPECIALTIES)) is None
