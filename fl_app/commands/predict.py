"""``clinical-fl-predict``: classify notes with the adapter of a run (MLflow run id, registered
model, or a folder), here or through the prediction service. Notes are de-identified as in
training first.

    clinical-fl-predict --run-id 3f2a... --text "CC: chest pain ..."
    clinical-fl-predict --model models:/clinical-fl-note-classifier@current --json --top-k 3 \\
        notes/*.txt
    clinical-fl-predict --adapter ./adapter notes/*.txt
    clinical-fl-predict --server https://coordinator:8443 --token-file token.txt \\
        --ca-cert certs/ca.crt notes/*.txt                      # the service reads the notes
    clinical-fl-predict --encrypted --server https://coordinator:8443 --adapter ./adapter \\
        --token-file token.txt --ca-cert certs/ca.crt notes/*.txt  # it never sees them
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from clinical_fl.serving.run_artifacts import adapter_folder, add_adapter_arguments
from tasks.errors import TaskInputError


@dataclass
class Row:
    """One note's answer, from whichever path computed it."""

    label: str
    probability: float
    probabilities: dict[str, float]

    def top(self, k: int) -> list[tuple[str, float]]:
        """The k most probable labels, most probable first (ties: the model's label order)."""
        return sorted(self.probabilities.items(), key=lambda item: -item[1])[:k]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(parser, required=False)
    parser.add_argument("--server", help="URL of a clinical-fl-serve service")
    parser.add_argument("--encrypted", action="store_true",
                        help="encode here and let --server evaluate the head on ciphertexts")
    parser.add_argument("--token-file", help="file whose first token line is this client's")
    parser.add_argument("--ca-cert", help="CA certificate that signed the service's (PEM)")
    parser.add_argument("--client-cert", nargs=2, metavar=("CERT", "KEY"),
                        help="client certificate and key, for a service with --client-ca")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line and note (note, label, probability; "
                             "with --top-k also top) instead of a table")
    parser.add_argument("--top-k", type=_positive, metavar="K",
                        help="also give the K most probable labels with their probabilities")
    parser.add_argument("--text", action="append", default=[], help="a note (repeatable)")
    parser.add_argument("files", nargs="*", help="text files, one note per file")
    return parser


def _read_notes(args: argparse.Namespace, parser: argparse.ArgumentParser
                ) -> tuple[list[str], list[str]]:
    texts, names = list(args.text), [f"text {i + 1}" for i in range(len(args.text))]
    for name in args.files:
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            parser.error(f"cannot read {name}: {err}")
        names.append(name)
    if not texts:
        parser.error("give at least one --text or file")
    return texts, names


def _service(args: argparse.Namespace):  # noqa: ANN202 - clinical_fl.serving.client imported lazily
    from clinical_fl.serving.client import ServiceClient

    token = None
    if args.token_file:
        try:
            lines = Path(args.token_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise TaskInputError(f"--token-file {args.token_file}: cannot read it ({err})") \
                from err
        tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        if not tokens:
            raise TaskInputError(f"--token-file {args.token_file}: no token in it")
        token = tokens[0]
    return ServiceClient(args.server, token=token, ca_cert=args.ca_cert,
                         client_cert=tuple(args.client_cert) if args.client_cert else None)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # MLflow draws a progress bar per artifact download: noise around a table of answers.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.encrypted and not args.server:
        parser.error("--encrypted needs --server URL")
    local = args.adapter or args.run_id or args.model
    if not args.server and not local:
        parser.error("give --adapter, --run-id or --model (or --server to ask a service)")
    if args.encrypted and not local:
        parser.error("--encrypted encodes notes here: give the global adapter with --adapter, "
                     "--run-id or --model")
    texts, names = _read_notes(args, parser)
    try:
        rows = _predict(args, texts)
    except Exception as err:  # noqa: BLE001 - one message for input, model and service errors
        import httpx

        from clinical_fl.serving.client import ServiceError

        if not isinstance(err, TaskInputError | ServiceError | OSError | ValueError
                          | httpx.HTTPError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = _json_lines(names, rows, args.top_k) if args.json else _table(names, rows,
                                                                          args.top_k)
    print("\n".join(lines))
    return 0


def _table(names: list[str], rows: list[Row], top_k: int | None) -> list[str]:
    """Tab-separated, a header line first; with --top-k K, the 2nd to Kth labels follow."""
    ranks = range(2, (top_k or 1) + 1)
    header = ["note", "label", "probability"]
    header += [f"{column}_{rank}" for rank in ranks for column in ("label", "probability")]
    lines = ["\t".join(header)]
    for name, row in zip(names, rows, strict=True):
        cells = [name, row.label, f"{row.probability:.3f}"]
        for label, probability in row.top(top_k or 1)[1:]:
            cells += [label, f"{probability:.3f}"]
        lines.append("\t".join(cells))
    return lines


def _json_lines(names: list[str], rows: list[Row], top_k: int | None) -> list[str]:
    """JSON Lines: one object per note, in the order given."""
    lines = []
    for name, row in zip(names, rows, strict=True):
        record: dict = {"note": name, "label": row.label,
                        "probability": round(row.probability, 6)}
        if top_k:
            record["top"] = [{"label": label, "probability": round(p, 6)}
                             for label, p in row.top(top_k)]
        lines.append(json.dumps(record))
    return lines


def _predict(args: argparse.Namespace, texts: list[str]) -> list[Row]:
    if args.server and not args.encrypted:
        with _service(args) as client:
            return [Row(p["label"], p["probability"], p["probabilities"])
                    for p in client.predict(texts)]
    from tasks.model.predict import NoteClassifier

    # The model is in memory once loaded: a downloaded adapter's folder goes right away.
    with adapter_folder(args) as adapter:
        local = NoteClassifier(adapter, args.base_model)
    if not args.encrypted:
        predictions = local.predict(texts)
    else:
        from clinical_fl.serving.client import EncryptedPredictor

        with _service(args) as client:
            predictions = EncryptedPredictor(local, client).predict(texts)
    return [Row(p.label, p.probability, p.probabilities) for p in predictions]


if __name__ == "__main__":
    sys.exit(main())
