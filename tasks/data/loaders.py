"""Reading a hospital's exported notes: CSV, JSONL, Parquet or a Hugging Face dataset.

A path may be one file, a glob of parts (``exports/part*.csv``) or a folder
(every CSV/JSONL/Parquet file in it, in name order). Every problem is reported
with the file, the row and the column, before any training starts:
unreadable files, bytes that are not UTF-8, missing columns, missing labels.
Empty texts are not an error: they are counted, dropped and reported.

Rows are numbered as a spreadsheet shows them: the first data row of a CSV
is row 2 (row 1 is the header); JSONL rows are line numbers.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from clinical_fl.settings.data import DataFormat, DataSettings, DataSource
from tasks.errors import DataFileError, UnknownLabelsError

_SUFFIX_FORMATS = {".csv": DataFormat.csv, ".jsonl": DataFormat.jsonl,
                   ".ndjson": DataFormat.jsonl, ".parquet": DataFormat.parquet}


@dataclass
class LoadReport:
    """What loading found, for the hospital's logs and the server's preflight."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    empty_texts_dropped: int = 0
    empty_text_rows: list[str] = field(default_factory=list)  # "file:row", first 10

    def summary(self) -> str:
        text = f"{self.rows} records from {len(self.files)} file(s)"
        if self.empty_texts_dropped:
            text += (f"; {self.empty_texts_dropped} empty text(s) dropped (e.g. "
                     f"{', '.join(self.empty_text_rows[:3])})")
        return text


@dataclass
class Records:
    """Texts with their label names and, where configured, site and split values."""

    text: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    site: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)  # "file, row N" of each record
    report: LoadReport = field(default_factory=LoadReport)

    def to_dataset(self) -> datasets.Dataset:
        columns = {"text": self.text, "label": self.label}
        if self.site:
            columns["site"] = self.site
        return datasets.Dataset.from_dict(
            columns, features=datasets.Features({k: datasets.Value("string") for k in columns}))

    def where_split(self, value: str | None, keep: bool) -> Records:
        """Rows whose split equals ``value`` (keep) or differs from it (not keep)."""
        if value is None or not self.split:
            return self if not keep else Records(report=self.report)
        chosen = [i for i, s in enumerate(self.split) if (s == value) == keep]
        return Records(text=[self.text[i] for i in chosen], label=[self.label[i] for i in chosen],
                       site=[self.site[i] for i in chosen] if self.site else [],
                       split=[self.split[i] for i in chosen],
                       origin=[self.origin[i] for i in chosen], report=self.report)

    def check_labels(self, labels: list[str], column: str) -> None:
        """Fail if any record's label is outside the global label set. The message (for the
        hospital's log) names the first; what may leave is the count of such records."""
        known = set(labels)
        unknown = [(name, origin) for name, origin in zip(self.label, self.origin, strict=True)
                   if name not in known]
        if unknown:
            name, origin = unknown[0]
            raise UnknownLabelsError(
                f"{origin}, column '{column}': label '{name}' is not in the global label set "
                f"{labels} ({len(unknown)} record(s) in all); add it to data.labels or remove "
                "the record", key="data.labels", counts={"records": len(unknown)})


def resolve_files(path: str, data_format: DataFormat) -> list[Path]:
    """The files a path names: itself, the files a glob matches, or a folder's data files."""
    expanded = os.path.expanduser(path)
    if any(ch in expanded for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(expanded) if Path(p).is_file())
        if not files:
            raise DataFileError(f"data.path='{path}': the pattern matches no files",
                                key="data.path")
    elif Path(expanded).is_dir():
        files = sorted(p for p in Path(expanded).iterdir()
                       if p.is_file() and (p.suffix.lower() in _SUFFIX_FORMATS
                                           if data_format == DataFormat.auto
                                           else _format_of(p, data_format) == data_format))
        if not files:
            raise DataFileError(f"data.path='{path}': the folder holds no CSV, JSONL or "
                                "Parquet files", key="data.path")
    elif Path(expanded).is_file():
        files = [Path(expanded)]
    else:
        raise DataFileError(f"data.path='{path}': no such file or folder", key="data.path")
    for file in files:
        _format_of(file, data_format)  # fail on an unknown suffix before reading anything
    return files


def _format_of(file: Path, data_format: DataFormat) -> DataFormat:
    if data_format != DataFormat.auto:
        return data_format
    found = _SUFFIX_FORMATS.get(file.suffix.lower())
    if found is None:
        raise DataFileError(f"{file}: cannot tell the format from the suffix "
                            f"'{file.suffix}'; expected .csv, .jsonl or .parquet, or set "
                            "data.format")
    return found


def _decode(file: Path) -> tuple[str, int | None]:
    """The file's text, and the line of its first non-UTF-8 byte (None: all valid).

    Invalid bytes are kept as surrogate escapes so that the reader can still find
    the row and column they sit in, which is what the error should name.
    """
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise DataFileError(f"{file}: cannot read the file ({err.strerror or err})") from err
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as err:
        bad_line = raw.count(b"\n", 0, err.start) + 1
        return raw.decode("utf-8-sig", errors="surrogateescape"), bad_line


_ESCAPED = re.compile("[\udc80-\udcff]")


def _not_utf8(file: Path, where: str, value: str) -> DataFileError:
    byte = ord(_ESCAPED.search(value).group()) - 0xDC00
    return DataFileError(f"{file}, {where}: byte 0x{byte:02x} is not UTF-8; re-export the "
                         "file as UTF-8")


def _check_utf8(file: Path, row: int, record: dict) -> None:
    for column, value in record.items():
        if isinstance(value, str) and _ESCAPED.search(value):
            raise _not_utf8(file, f"row {row}, column '{column}'", value)


def _csv_rows(file: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    text, bad_line = _decode(file)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = list(reader.fieldnames or [])
        if bad_line is not None and any(_ESCAPED.search(h) for h in header):
            raise _not_utf8(file, "header", next(h for h in header if _ESCAPED.search(h)))
        rows = []
        for record in reader:
            # Spreadsheet numbering: the header is row 1.
            row = len(rows) + 2
            if bad_line is not None:
                _check_utf8(file, row, record)
            rows.append((row, record))
    except csv.Error as err:
        raise DataFileError(f"{file}, line {reader.line_num}: not valid CSV ({err})") from err
    if bad_line is not None:  # the bad byte sits outside every field (e.g. a stray quote)
        raise DataFileError(f"{file}, line {bad_line}: bytes that are not UTF-8")
    return header, rows


def _jsonl_rows(file: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    text, bad_line = _decode(file)
    rows, header = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{file}, row {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise DataFileError(f"{file}, row {number}: expected a JSON object per line, "
                                f"got {type(record).__name__}")
        if bad_line is not None:
            _check_utf8(file, number, record)
        header = header or list(record)
        rows.append((number, record))
    if bad_line is not None:
        raise DataFileError(f"{file}, line {bad_line}: bytes that are not UTF-8")
    return header, rows


def _parquet_rows(file: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as err:
        raise DataFileError(f"{file}: cannot read as Parquet ({err})") from err
    try:
        records = table.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException) as err:
        raise DataFileError(f"{file}: holds text that is not UTF-8 ({err})") from err
    return table.column_names, [(i + 1, r) for i, r in enumerate(records)]


_READERS = {DataFormat.csv: _csv_rows, DataFormat.jsonl: _jsonl_rows,
            DataFormat.parquet: _parquet_rows}


def _hf_rows(settings: DataSettings, path: str) -> tuple[list[str], list[tuple[int, dict]]]:
    where = Path(os.path.expanduser(path))
    try:
        if where.is_dir():
            loaded = datasets.load_from_disk(str(where))
        else:
            loaded = datasets.load_dataset(path)
    except (FileNotFoundError, ValueError, OSError, ConnectionError) as err:
        raise DataFileError(f"data.path='{path}': not a datasets.load_from_disk folder, and "
                            f"not loadable as a Hugging Face hub dataset ({err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        split_column = settings.split_column or "split"
        parts = []
        for name, part in loaded.items():
            part = part.add_column(split_column, [name] * len(part)) \
                if split_column not in part.column_names else part
            parts.append(part)
        loaded = datasets.concatenate_datasets(parts)
    return loaded.column_names, [(i + 1, r) for i, r in enumerate(loaded)]


def _value(record: dict, column: str, file: str, row: int) -> str:
    value = record.get(column)
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from a numeric column
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFileError(f"{file}, row {row}, column '{column}': not UTF-8") from err
    return str(value).strip() if column != "text" else str(value)


def load_records(settings: DataSettings, path: str | None = None) -> Records:
    """All records under ``path`` (default ``data.path``), checked column by column."""
    path = path or settings.path
    if not path:
        raise DataFileError(f"data.source={settings.source.value} needs data.path (a file, a "
                            "glob of parts, or a folder)")
    wanted = {"text": settings.text_column, "label": settings.label_column}
    optional = {"site": settings.site_column, "split": settings.split_column}
    records = Records()
    sources: list[tuple[str, list[str], list[tuple[int, dict]]]]
    if settings.source == DataSource.huggingface:
        header, rows = _hf_rows(settings, path)
        sources = [(path, header, rows)]
    else:
        sources = []
        for file in resolve_files(path, settings.format):
            header, rows = _READERS[_format_of(file, settings.format)](file)
            sources.append((str(file), header, rows))
    for file, header, rows in sources:
        needed = [c for c in (*wanted.values(), *optional.values()) if c]
        missing = [c for c in needed if c not in header] if rows else []
        if missing:
            setting = {column: f"data.{role}_column" for role, column in
                       (*optional.items(), *wanted.items()) if column}
            raise DataFileError(f"{file}: no column {', '.join(repr(c) for c in missing)}; "
                                f"the file has {header}. Set data.text_column / "
                                "data.label_column / data.site_column / data.split_column",
                                key=setting[missing[0]])
        records.report.files.append(file)
        for row, record in rows:
            text = _value(record, wanted["text"], file, row)
            if not text.strip():
                records.report.empty_texts_dropped += 1
                if len(records.report.empty_text_rows) < 10:
                    records.report.empty_text_rows.append(f"{file}:{row}")
                continue
            label = _value(record, wanted["label"], file, row)
            if not label:
                raise DataFileError(f"{file}, row {row}, column '{wanted['label']}': the label "
                                    "is empty; every record needs one")
            records.text.append(text)
            records.label.append(label)
            records.origin.append(f"{file}, row {row}")
            if optional["site"]:
                site = _value(record, optional["site"], file, row)
                if not site:
                    raise DataFileError(f"{file}, row {row}, column '{optional['site']}': "
                                        "the site is empty")
                records.site.append(site)
            if optional["split"]:
                records.split.append(_value(record, optional["split"], file, row))
    records.report.rows = len(records.text)
    return records
