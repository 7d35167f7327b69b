"""Loading hospital exports: formats, paths, columns, and every bad input named precisely."""

import json
from collections import Counter

import datasets
import pandas as pd
import pytest

from clinical_fl.settings.compose import ConfigError, compose_config
from clinical_fl.settings.data import DataFormat, DataSettings, DataSource, Partitioning
from tasks.data.hospital_data import load_hospital_data, load_server_test_set, source_labels
from tasks.data.loaders import load_records
from tasks.errors import DataFileError, UnknownLabelsError

ROWS = [
    {"note": "chest pain on exertion", "dx": "cardiology", "site": "north", "split": "train"},
    {"note": "wheeze and cough", "dx": "pulmonology", "site": "north", "split": "train"},
    {"note": "palpitations at night", "dx": "cardiology", "site": "south", "split": "train"},
    {"note": "dyspnoea, crackles", "dx": "pulmonology", "site": "south", "split": "test"},
]


def files_settings(path, **kw) -> DataSettings:
    return DataSettings(source=DataSource.files, path=str(path), text_column="note",
                        label_column="dx", **kw)


def write(tmp_path, name: str, rows: list[dict]):
    path = tmp_path / name
    frame = pd.DataFrame(rows)
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["notes.csv", "notes.jsonl", "notes.parquet"])
def test_each_format_reads_text_label_site_and_split(tmp_path, name):
    path = write(tmp_path, name, ROWS)
    records = load_records(files_settings(path, site_column="site", split_column="split"))
    assert records.text == [r["note"] for r in ROWS]
    assert records.label == [r["dx"] for r in ROWS]
    assert records.site == [r["site"] for r in ROWS]
    assert records.split == [r["split"] for r in ROWS]
    assert records.report.files == [str(path)]


def test_glob_of_parts_and_folder_read_every_part_in_name_order(tmp_path):
    write(tmp_path, "part02.csv", ROWS[2:])
    write(tmp_path, "part01.csv", ROWS[:2])
    (tmp_path / "README.txt").write_text("not data")
    by_glob = load_records(files_settings(tmp_path / "part*.csv"))
    by_folder = load_records(files_settings(tmp_path))
    assert by_glob.text == by_folder.text == [r["note"] for r in ROWS]
    assert len(by_folder.report.files) == 2


def test_hugging_face_load_from_disk_folder_with_splits(tmp_path):
    def part(rows):
        return datasets.Dataset.from_list([{"note": r["note"], "dx": r["dx"]} for r in rows])

    datasets.DatasetDict({"train": part(ROWS[:3]), "test": part(ROWS[3:])}).save_to_disk(
        tmp_path / "hf")
    settings = DataSettings(source=DataSource.huggingface, path=str(tmp_path / "hf"),
                            text_column="note", label_column="dx", split_column="split",
                            partitioning=Partitioning.iid)
    test_set = load_server_test_set(settings, source_labels(settings))
    assert test_set["text"] == [ROWS[3]["note"]]
    hospital = load_hospital_data(settings, source_labels(settings), 0, 1)
    assert len(hospital.train) + len(hospital.eval) == 3


def test_empty_texts_are_counted_dropped_and_reported(tmp_path):
    rows = [*ROWS, {"note": "   ", "dx": "cardiology", "site": "north", "split": "train"},
            {"note": "", "dx": "cardiology", "site": "north", "split": "train"}]
    path = write(tmp_path, "notes.csv", rows)
    records = load_records(files_settings(path))
    assert len(records.text) == 4
    assert records.report.empty_texts_dropped == 2
    assert records.report.empty_text_rows == [f"{path}:6", f"{path}:7"]
    assert "2 empty text(s) dropped" in records.report.summary()


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = write(tmp_path, "notes.csv", ROWS)
    with pytest.raises(DataFileError, match=r"notes.csv: no column 'diagnosis'.*has \['note'"):
        load_records(DataSettings(source=DataSource.files, path=str(path), text_column="note",
                                  label_column="diagnosis"))


def test_unknown_label_names_file_row_and_column(tmp_path):
    path = write(tmp_path, "notes.csv", ROWS)
    with pytest.raises(UnknownLabelsError,
                       match=r"notes.csv, row 3, column 'dx': label 'pulmonology' is not in") \
            as raised:
        load_hospital_data(files_settings(path, labels=["cardiology", "neurology"]),
                           ["cardiology", "neurology"], 0, 2)
    # What may leave the hospital: the key and how many records (both pulmonology notes),
    # never the label.
    assert raised.value.key == "data.labels" and raised.value.counts == {"records": 2}


def test_non_utf8_bytes_name_the_file_row_and_column(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes(b'note,dx\n"chest pain\nat rest",cardiology\nna\xefve cough,pulmonology\n')
    with pytest.raises(DataFileError,
                       match=r"notes.csv, row 3, column 'note': byte 0xef is not UTF-8"):
        load_records(files_settings(path))
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_bytes(b'{"note": "a", "dx": "cardiology"}\n{"note": "b", "dx": "card\xe9"}\n')
    with pytest.raises(DataFileError,
                       match=r"notes.jsonl, row 2, column 'dx': byte 0xe9 is not UTF-8"):
        load_records(files_settings(jsonl))


def test_bad_json_line_names_the_row(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"note": "a", "dx": "cardiology"}\n{"note": "b", "dx": \n')
    with pytest.raises(DataFileError, match=r"notes.jsonl, row 2: not valid JSON"):
        load_records(files_settings(path))


def test_unreadable_and_missing_paths_fail_clearly(tmp_path):
    with pytest.raises(DataFileError, match=r"no such file or folder"):
        load_records(files_settings(tmp_path / "absent.csv"))
    with pytest.raises(DataFileError, match=r"pattern matches no files"):
        load_records(files_settings(tmp_path / "part*.csv"))
    (tmp_path / "notes.xlsx").write_text("x")
    with pytest.raises(DataFileError, match=r"notes.xlsx: cannot tell the format"):
        load_records(files_settings(tmp_path / "notes.xlsx"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match=r"broken.parquet: cannot read as Parquet"):
        load_records(files_settings(tmp_path / "broken.parquet", format=DataFormat.parquet))


def test_empty_label_names_the_row(tmp_path):
    path = write(tmp_path, "notes.csv", [*ROWS[:2], {"note": "x", "dx": "", "site": "n"}])
    with pytest.raises(DataFileError, match=r"notes.csv, row 4, column 'dx': the label is empty"):
        load_records(files_settings(path))


def test_server_fixes_labels_from_the_data_and_keeps_the_test_split(tmp_path):
    path = write(tmp_path, "notes.csv", ROWS)
    settings = files_settings(path, split_column="split")
    assert source_labels(settings) == ["cardiology", "pulmonology"]
    assert load_server_test_set(settings, ["cardiology", "pulmonology"])["text"] == [
        ROWS[3]["note"]]


def test_data_path_reads_the_hospitals_own_file_without_partitioning(tmp_path):
    path = write(tmp_path, "notes.csv", ROWS)
    settings = files_settings(tmp_path / "elsewhere.csv", split_column="split")
    data = load_hospital_data(settings, ["cardiology", "pulmonology"], 3, 8, data_path=str(path))
    assert len(data.train) + len(data.eval) == 3, "the test-split row stays out"
    assert data.hospital == 3


def corpus(tmp_path, n_per_label: int = 60):
    rows = [{"note": f"{label} note {i}", "dx": label, "site": f"h{i % 3}"}
            for label in ("a", "b", "c", "d") for i in range(n_per_label)]
    return write(tmp_path, "corpus.csv", rows)


def shares(settings, parts: int, labels):
    return [load_hospital_data(settings, labels, k, parts) for k in range(parts)]


def test_natural_partition_gives_each_site_its_own_records(tmp_path):
    settings = files_settings(corpus(tmp_path), site_column="site",
                              partitioning=Partitioning.natural)
    hospitals = shares(settings, 3, ["a", "b", "c", "d"])
    sites = [set(h.train["site"]) | set(h.eval["site"]) for h in hospitals]
    assert sites == [{"h0"}, {"h1"}, {"h2"}]
    with pytest.raises(DataFileError, match=r"names 3 sites .* federation has 2 hospitals"):
        load_hospital_data(settings, ["a", "b", "c", "d"], 0, 2)


def test_iid_partition_is_even_and_disjoint(tmp_path):
    settings = files_settings(corpus(tmp_path), partitioning=Partitioning.iid)
    hospitals = shares(settings, 4, ["a", "b", "c", "d"])
    sizes = [len(h.train) + len(h.eval) for h in hospitals]
    assert sizes == [60] * 4
    texts = [set(h.train["text"]) | set(h.eval["text"]) for h in hospitals]
    assert len(set().union(*texts)) == 240


def test_dirichlet_partition_skews_labels_more_as_alpha_shrinks(tmp_path):
    path = corpus(tmp_path, 100)

    def skew(alpha: float) -> float:
        settings = files_settings(path, partitioning=Partitioning.dirichlet,
                                  label_skew_alpha=alpha)
        hospitals = shares(settings, 4, ["a", "b", "c", "d"])
        # Mean share of each hospital's most frequent label.
        tops = []
        for h in hospitals:
            counts = Counter(h.train["label"]) + Counter(h.eval["label"])
            tops.append(max(counts.values()) / sum(counts.values()))
        assert sum(len(h.train) + len(h.eval) for h in hospitals) == 400
        return sum(tops) / len(tops)

    assert skew(0.1) > skew(1000.0) + 0.2
    assert skew(1000.0) < 0.4


def test_size_partition_gives_unequal_sizes_that_sum_to_the_corpus(tmp_path):
    settings = files_settings(corpus(tmp_path), partitioning=Partitioning.size, size_skew=1.0)
    hospitals = shares(settings, 4, ["a", "b", "c", "d"])
    sizes = [len(h.train) + len(h.eval) for h in hospitals]
    assert sum(sizes) == 240 and max(sizes) > 2 * min(sizes)


def test_config_rejects_file_sources_without_path_or_site_column():
    with pytest.raises(ConfigError, match=r"data.path"):
        compose_config(["data=files", "data.path=null"])
    with pytest.raises(ConfigError, match=r"data.site_column"):
        compose_config(["data=files", "data.path=/x.csv", "data.partitioning=natural"])
    with pytest.raises(ConfigError, match=r"data.size_skew"):
        compose_config(["data.partitioning=size"])
