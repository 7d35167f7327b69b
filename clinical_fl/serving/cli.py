"""``clinical-fl-serve``: the prediction service for a trained run.

    clinical-fl-serve --run-id 3f2a... --tls-cert certs/superlink.pem \\
        --tls-key certs/superlink.key --token-file service-tokens.txt
    clinical-fl-serve --model models:/clinical-fl-note-classifier@current --tls-cert ... \\
        --tls-key ... --token-file service-tokens.txt --access-log service-access.log
    clinical-fl-serve --adapter ./adapter --insecure          # local use: plain HTTP

Secure by default: TLS and client authentication (bearer tokens from --token-file, and/or
client certificates signed by --client-ca). Plain HTTP needs --insecure and a loopback host.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from clinical_fl.serving.access_log import ACCESS_LOGGER
from clinical_fl.serving.app import MiB, ServiceSettings, create_app
from clinical_fl.serving.run_artifacts import adapter_folder, add_adapter_arguments, describe_source
from tasks.errors import TaskInputError

log = logging.getLogger("clinical-fl-serve")

# The service's limits have one source, ServiceSettings: its defaults are the flags' defaults.
_DEFAULTS = ServiceSettings()


def read_tokens(path: Path) -> frozenset[str]:
    """One token per line; blank lines and '#' comments ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TaskInputError(f"--token-file {path}: cannot read it ({err})") from err
    tokens = frozenset(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))
    short = [i for i, t in enumerate(tokens) if len(t) < 16]
    if not tokens or short:
        raise TaskInputError(f"--token-file {path}: expected one token of at least 16 "
                             "characters per line (make one with `bash deploy/service-token.sh "
                             "FILE`)")
    return tokens


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_adapter_arguments(parser, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--tls-cert", help="server certificate (PEM), e.g. from deploy/certs.sh")
    parser.add_argument("--tls-key", help="its private key")
    parser.add_argument("--token-file", help="bearer tokens clients must send, one per line")
    parser.add_argument("--client-ca", help="require client certificates signed by this CA")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP without authentication, loopback only (local use)")
    parser.add_argument("--max-batch", type=int, default=_DEFAULTS.max_batch,
                        help="notes per forward pass (default: %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=_DEFAULTS.max_wait_ms,
                        help="how long a request waits for others to share its batch "
                             "(default: %(default)s)")
    parser.add_argument("--max-notes", type=int, default=_DEFAULTS.max_notes,
                        help="notes per request (default: %(default)s)")
    parser.add_argument("--max-request-mb", type=float,
                        default=_DEFAULTS.max_request_bytes / MiB,
                        help="largest /predict body (default: %(default)s)")
    parser.add_argument("--max-encrypted-mb", type=float,
                        default=_DEFAULTS.max_encrypted_bytes / MiB,
                        help="largest /encrypted/* body (a client's keys are about 8 MB; "
                             "default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=64,
                        help="open connections at once; more are answered 503")
    parser.add_argument("--rate-limit", type=int, default=_DEFAULTS.rate_limit_per_minute,
                        help="notes per client and minute (0: unlimited; default: "
                             "%(default)s)")
    parser.add_argument("--access-log", metavar="FILE",
                        help="also append the access log (one line per request, no note text) "
                             "to FILE")
    parser.add_argument("--metrics", action="store_true",
                        help="serve GET /metrics (request counts and latencies; needs a token "
                             "like every data endpoint)")
    return parser


def _check_security(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.insecure:
        if args.tls_cert or args.token_file or args.client_ca:
            parser.error("--insecure serves plain HTTP without authentication; drop it to use "
                         "TLS and tokens")
        if not _is_loopback(args.host):
            parser.error(f"--insecure only on a loopback address (127.0.0.1), not --host "
                         f"{args.host}: anyone on the network could read the notes")
        return
    if not (args.tls_cert and args.tls_key):
        parser.error("TLS needs --tls-cert and --tls-key (make them with `bash deploy/certs.sh "
                     "DIR`), or --insecure for local plain HTTP")
    if not (args.token_file or args.client_ca):
        parser.error("client authentication needs --token-file and/or --client-ca")
    for flag in ("tls_cert", "tls_key", "token_file", "client_ca"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            parser.error(f"--{flag.replace('_', '-')} {value}: no such file")


def add_access_log_file(path: Path) -> logging.Handler:
    """Append the access log to ``path`` too: the hospital's audit trail of who asked what
    (never the note), with a timestamp per line."""
    try:
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as err:
        raise TaskInputError(f"--access-log {path}: cannot open it ({err})") from err
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    return handler


def _service_settings(args: argparse.Namespace, tokens: frozenset[str]) -> ServiceSettings:
    return ServiceSettings(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_notes=args.max_notes,
        max_request_bytes=int(args.max_request_mb * MiB),
        max_encrypted_bytes=int(args.max_encrypted_mb * MiB),
        rate_limit_per_minute=args.rate_limit, tokens=tokens, metrics=args.metrics)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_security(args, parser)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a log, not a tty
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        tokens = read_tokens(Path(args.token_file)) if args.token_file else frozenset()
        if args.access_log:
            add_access_log_file(Path(args.access_log))
        from tasks.model.predict import NoteClassifier

        # The model is in memory once loaded: a downloaded adapter's folder goes right away.
        with adapter_folder(args) as adapter:
            classifier = NoteClassifier(adapter, args.base_model)
        app = create_app(classifier, _service_settings(args, tokens))
    except (TaskInputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import ssl

    import uvicorn

    log.info("serving %s (model %s, labels %s) on %s://%s:%d", describe_source(args),
             classifier.fingerprint[:12], ",".join(classifier.labels),
             "http" if args.insecure else "https", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                ssl_ca_certs=args.client_ca,
                ssl_cert_reqs=ssl.CERT_REQUIRED if args.client_ca else ssl.CERT_NONE,
                limit_concurrency=args.max_connections,
                # X-Forwarded-For from a local client would otherwise choose the client id
                # (the access log's, the rate limit's); the service is reached directly.
                proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
