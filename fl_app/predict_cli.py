"""``clinical-fl-predict``: classify notes with the adapter of a run (MLflow run id) or a folder,
here or through the prediction service. Notes are de-identified as in training first.

    clinical-fl-predict --run-id 3f2a... --text "CC: chest pain ..."
    clinical-fl-predict --adapter ./adapter notes/*.txt
    clinical-fl-predict --server https://coordinator:8443 --token-file token.txt \\
        --ca-cert certs/ca.crt notes/*.txt                      # the service reads the notes
    clinical-fl-predict --encrypted --server https://coordinator:8443 --adapter ./adapter \\
        --token-file token.txt --ca-cert certs/ca.crt notes/*.txt  # it never sees them
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.run_artifacts import adapter_from, add_adapter_arguments
from tasks.errors import TaskInputError


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


def _service(args: argparse.Namespace):  # noqa: ANN202 - serving.client imported lazily
    from serving.client import ServiceClient

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
    if args.encrypted and not args.server:
        parser.error("--encrypted needs --server URL")
    if not args.server and not (args.adapter or args.run_id):
        parser.error("give --adapter or --run-id (or --server to ask a service)")
    if args.encrypted and not (args.adapter or args.run_id):
        parser.error("--encrypted encodes notes here: give the global adapter with --adapter "
                     "or --run-id")
    texts, names = _read_notes(args, parser)
    try:
        rows = _predict(args, texts)
    except Exception as err:  # noqa: BLE001 - one message for input, model and service errors
        import httpx

        from serving.client import ServiceError

        if not isinstance(err, TaskInputError | ServiceError | OSError | ValueError
                          | httpx.HTTPError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, (label, probability) in zip(names, rows, strict=True):
        print(f"{name}\t{label}\t{probability:.3f}")
    return 0


def _predict(args: argparse.Namespace, texts: list[str]) -> list[tuple[str, float]]:
    if args.server and not args.encrypted:
        with _service(args) as client:
            return [(p["label"], p["probability"]) for p in client.predict(texts)]
    from tasks.model.predict import NoteClassifier

    adapter = adapter_from(args)
    local = NoteClassifier(adapter, args.base_model)
    if not args.encrypted:
        return [(p.label, p.probability) for p in local.predict(texts)]
    from serving.client import EncryptedPredictor

    with _service(args) as client:
        return [(p.label, p.probability) for p in EncryptedPredictor(local, client).predict(texts)]


if __name__ == "__main__":
    sys.exit(main())
