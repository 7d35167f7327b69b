"""The prediction service as users run it: a real ``clinical-fl-serve`` process on 127.0.0.1
with TLS (certificates from deploy/certs.sh) and a bearer token, started and stopped by PID."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from tenseal import sealapi

from clinical_fl.serving import cli as serve_cli
from clinical_fl.serving import run_artifacts, wire
from clinical_fl.serving.access_log import ACCESS_LOGGER
from clinical_fl.serving.app import ServiceSettings, create_app
from clinical_fl.serving.ckks_head import ClientKeys, HeadLayout
from clinical_fl.serving.client import EncryptedPredictor, ServiceClient, ServiceError
from clinical_fl.serving.pyfunc import log_note_model
from clinical_fl.settings.data import DeidSettings
from clinical_fl.settings.model import ModelSettings
from fl_app.commands import predict as predict_cli
from tasks.data.synthetic_notes import SPECIALTIES, generate_hospital_notes
from tasks.errors import TaskInputError
from tasks.model.build import build_model, load_trainable_state, save_adapter, trainable_state
from tasks.model.predict import NoteClassifier
from tests.flower_processes import ROOT, free_port
from tests.support import wait_until

TOKEN = "test-token-" + "7" * 32
LABELS = list(SPECIALTIES)
NAMED = ("Patient: John Smith, MRN: 12345678, seen on 03/14/2024 by Dr. Alice Walker for "
         "crushing chest pain radiating to the left arm, troponin elevated.")
PLACEHOLDERS = ("Patient: [NAME], [ID], seen on [DATE] by Dr. [NAME] for "
                "crushing chest pain radiating to the left arm, troponin elevated.")


@pytest.fixture(scope="module")
def adapter(tiny_bert, tmp_path_factory) -> Path:
    """An adapter with a head that separates the labels (weights moved off their init)."""
    settings = ModelSettings(name_or_path=str(tiny_bert), max_length=128)
    model = build_model(settings, LABELS, seed=0)
    generator = torch.Generator().manual_seed(1)
    load_trainable_state(model, {k: v + 0.3 * torch.randn(v.shape, generator=generator)
                                 for k, v in trainable_state(model).items()})
    return save_adapter(model, tmp_path_factory.mktemp("adapter"), settings, LABELS,
                        DeidSettings())


@pytest.fixture(scope="module")
def local(adapter) -> NoteClassifier:
    return NoteClassifier(adapter)


def _serve(adapter: Path, root: Path, *security: str):
    """Start clinical-fl-serve with certificates from deploy/certs.sh; yield its URL and CA
    certificate; stop it by its PID."""
    port = free_port()
    log = (root / "service.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "clinical_fl.serving.cli", "--adapter", str(adapter),
         "--port", str(port),
         "--tls-cert", str(root / "certs" / "superlink.pem"),
         "--tls-key", str(root / "certs" / "superlink.key"), *security],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, ca = f"https://127.0.0.1:{port}", root / "certs" / "ca.crt"

    def up() -> bool:
        assert process.poll() is None, (root / "service.log").read_text()
        try:  # a TCP connect is enough: /health may need a client certificate
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(up, 120, "the service listens")
        yield url, ca
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def _deploy(script: str, *args: str) -> None:
    out = subprocess.run(["bash", str(ROOT / "deploy" / script), *args], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def service(adapter, tmp_path_factory):
    """(URL, CA certificate) of a TLS service with one token."""
    root = tmp_path_factory.mktemp("service")
    _deploy("certs.sh", str(root / "certs"))
    (root / "tokens.txt").write_text(f"# one line per client\n{TOKEN}\n")
    yield from _serve(adapter, root, "--token-file", str(root / "tokens.txt"),
                      "--max-wait-ms", "50", "--max-request-mb", "0.5",
                      "--max-encrypted-mb", "16")


@pytest.fixture
def client(service):
    url, ca = service
    with ServiceClient(url, token=TOKEN, ca_cert=ca) as c:
        yield c


def _trust(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _notes(count: int) -> list[str]:
    return [n.text for n in generate_hospital_notes(901, count, seed=5, label_skew_alpha=100.0)]


def test_plain_predictions_agree_with_the_in_process_model(client, local):
    notes = _notes(12)
    remote = client.predict(notes)
    expected = local.predict(notes)
    assert [p["label"] for p in remote] == [p.label for p in expected]
    np.testing.assert_allclose([[p["probabilities"][k] for k in LABELS] for p in remote],
                               [[p.probabilities[k] for k in LABELS] for p in expected],
                               atol=1e-5)


def test_encrypted_round_trip_agrees_with_plain_and_carries_no_text_or_vector(client, local):
    notes = _notes(10)
    vectors = local.vectors(notes)
    predicted = EncryptedPredictor(local, client).logits(notes)
    plain = local.logits(notes)
    assert np.abs(predicted - plain).max() < 1e-3
    assert (predicted.argmax(1) == plain.argmax(1)).all()

    keys = ClientKeys(HeadLayout.from_dict(client._call("GET", "/encrypted/spec").json()))
    body = wire.pack({"key_id": keys.key_id, "notes": 10, "fingerprint": local.fingerprint,
                      "dimension": vectors.shape[1], "classes": len(LABELS)},
                     keys.encrypt(vectors))
    for note in notes:  # no text: not a note's words, not a de-identified one's
        assert note[:24].encode() not in body and note[-24:].encode() not in body
    for value in vectors[:, :4].ravel():  # no plaintext vector value, in any float width
        assert struct.pack("<d", value) not in body and struct.pack("<f", value) not in body
        assert struct.pack(">d", value) not in body and struct.pack(">f", value) not in body


def test_a_note_with_a_name_and_a_date_is_read_like_the_same_note_with_placeholders(client,
                                                                                     local):
    named, placeholders = client.predict([NAMED, PLACEHOLDERS])
    assert named["probabilities"] == pytest.approx(placeholders["probabilities"], abs=1e-6)
    assert local.deidentify([NAMED]) == [PLACEHOLDERS]
    np.testing.assert_allclose(*local.logits([NAMED, PLACEHOLDERS]), atol=1e-6)


def test_without_the_token_or_tls_only_health_ready_and_the_docs_answer(service):
    url, ca = service
    assert httpx.get(f"{url}/health", verify=_trust(ca)).json() == {"status": "ok"}
    with ServiceClient(url, ca_cert=ca) as anonymous:
        wait_until(lambda: httpx.get(f"{url}/ready", verify=_trust(ca)).status_code == 200, 60,
                   "the service is ready")
        assert anonymous.ready() == {"status": "ready"}
        assert "/predict" in anonymous._call("GET", "/openapi.json").json()["paths"]
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        for method, path in (("POST", "/predict"), ("GET", "/model"),
                             ("GET", "/encrypted/spec"), ("POST", "/encrypted/keys"),
                             ("POST", "/encrypted/predict")):
            response = httpx.request(method, f"{url}{path}", json={"notes": ["chest pain"]},
                                     headers=headers, verify=_trust(ca))
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == "unauthorized"
            assert "bearer token" in response.json()["detail"]
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
        httpx.get(url.replace("https", "http") + "/health", timeout=5)


def _context(spec: dict) -> sealapi.SEALContext:
    return HeadLayout.from_dict(spec).seal_context()


def _dump(cipher: sealapi.Ciphertext) -> bytes:
    from clinical_fl.serving.ckks_head import _Bytes

    return _Bytes.dump(cipher)


def _post(client: ServiceClient, path: str, **kwargs) -> httpx.Response:
    return client._http.post(path, **kwargs)


def test_bad_input_is_a_4xx_with_a_message_and_the_next_request_succeeds(client, local):
    spec = client._call("GET", "/encrypted/spec").json()
    keys = ClientKeys(HeadLayout.from_dict(spec))
    key_id = _post(client, "/encrypted/keys", content=keys.evaluation_keys).json()["key_id"]
    vectors = local.vectors(["knee pain after a fall"])

    def encrypted(header: dict, blobs: list[bytes]) -> httpx.Response:
        base = {"key_id": key_id, "notes": 1, "fingerprint": spec["fingerprint"],
                "dimension": spec["dimension"], "classes": spec["classes"]}
        return _post(client, "/encrypted/predict", content=wire.pack({**base, **header}, blobs))

    other = ClientKeys(HeadLayout(dimension=spec["dimension"], classes=spec["classes"],
                                  coeff_modulus_bits=(60, 40, 60)))
    transparent = sealapi.Ciphertext(_context(spec))
    transparent.resize(_context(spec), _context(spec).first_parms_id(), 2)
    cases = {  # each sent only after the previous one was answered and a good request served
        "malformed JSON": (lambda: _post(client, "/predict", content=b'{"notes": [',
                                         headers={"Content-Type": "application/json"}),
                           422, "JSON decode error"),
        "an empty note": (lambda: _post(client, "/predict", json={"notes": ["a", "  "]}), 422,
                          "note 1 is empty"),
        "a note too long": (lambda: _post(client, "/predict", json={"notes": ["x" * 200_001]}),
                            422, "at most 200000"),
        "no notes": (lambda: _post(client, "/predict", json={"notes": []}), 422,
                     "'notes' is empty"),
        "notes not a list": (lambda: _post(client, "/predict", json={"notes": "chest pain"}),
                             422, "list"),
        "a vector of the wrong size": (lambda: encrypted({"dimension": spec["dimension"] + 1},
                                                         keys.encrypt(vectors)), 422,
                                       f"reads {spec['dimension']} values per note"),
        "a ciphertext made with other parameters": (
            lambda: encrypted({}, other.encrypt(vectors)), 422, "not a CKKS ciphertext for"),
        "an all-zero (transparent) ciphertext": (
            lambda: encrypted({}, [_dump(transparent)]), 422, "not a fresh encryption"),
        "a body that is not ciphertexts": (
            lambda: _post(client, "/encrypted/predict", content=b"{}"), 422,
            "does not start with"),
        "keys that are not keys": (lambda: _post(client, "/encrypted/keys", content=b"\1" * 64),
                                   422, "not SEAL Galois keys"),
        "keys far too large": (lambda: _post(client, "/encrypted/keys",
                                             content=b"\1" * (12 << 20)),
                               413, "bytes of keys"),
        "an unknown key": (lambda: encrypted({"key_id": "0" * 64}, keys.encrypt(vectors)), 404,
                           "upload the keys"),
        "another adapter's vectors": (lambda: encrypted({"fingerprint": "f" * 64},
                                                        keys.encrypt(vectors)), 409,
                                      "another adapter"),
        "a count that is not a count": (lambda: encrypted({"notes": True},
                                                          keys.encrypt(vectors)), 422,
                                        "must be a count"),
        "an oversized request": (lambda: _post(client, "/predict",
                                               json={"notes": ["x" * 600_000]}),
                                 413, "over the limit"),
    }
    for what, (send, status, message) in cases.items():
        response = send()
        assert response.status_code == status, f"{what}: {response.text[:300]}"
        assert message in json.dumps(response.json()), f"{what}: {response.text[:300]}"
        body = response.json()  # one shape for every error
        assert set(body) == {"detail", "code"} and isinstance(body["detail"], str), what
        assert client.predict(["chest pain on exertion"])[0]["label"] in LABELS, what
    good = encrypted({}, keys.encrypt(vectors))
    _, blobs = wire.unpack(good.content)
    np.testing.assert_allclose(keys.decrypt(blobs, 1), local.logits(["knee pain after a fall"]),
                               atol=1e-3)


def test_requests_that_arrive_together_share_batches(local):
    with TestClient(create_app(local, ServiceSettings(max_wait_ms=100))) as app:
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(
                lambda note: app.post("/predict", json={"notes": [note]}), _notes(16)))
        assert all(r.status_code == 200 and len(r.json()["predictions"]) == 1 for r in results)
        batches = app.app.state.batcher.batches
    assert 1 <= batches < 16, f"16 concurrent requests ran in {batches} batches"


def test_a_bad_note_fails_only_its_own_request_when_batched(local):
    """Checked before batching; and a batch that fails anyway reruns its requests alone."""
    app = create_app(local, ServiceSettings(max_wait_ms=100))
    batcher = app.state.batcher
    real = batcher._run
    batcher._run = lambda notes: (real(notes) if "poison" not in notes
                                  else (_ for _ in ()).throw(TaskInputError("poisoned")))
    with TestClient(app) as http, ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda note: http.post("/predict", json={"notes": [note]}),
                                ["chest pain", "poison", "knee pain", "cough"]))
    assert [a.status_code for a in answers] == [200, 422, 200, 200]
    assert answers[1].json()["detail"] == "poisoned"


def test_predict_cli_asks_the_service_in_plain_and_encrypted(service, adapter, tmp_path,
                                                              capsys, local):
    url, ca = service
    (tmp_path / "token").write_text(TOKEN + "\n")
    notes = _notes(3)
    expected = [p.label for p in local.predict(notes)]
    common = ["--server", url, "--token-file", str(tmp_path / "token"), "--ca-cert", str(ca)]
    texts = [arg for note in notes for arg in ("--text", note)]
    for extra in ([], ["--encrypted", "--adapter", str(adapter)]):
        assert predict_cli.main(common + extra + texts) == 0
        header, *lines = capsys.readouterr().out.splitlines()
        assert header == "note\tlabel\tprobability"
        assert [line.split("\t")[1] for line in lines] == expected, extra
    assert predict_cli.main(["--server", url, "--ca-cert", str(ca), "--text", "x"]) == 2
    assert "401" in capsys.readouterr().err


def test_the_mlflow_model_loads_with_pyfunc_and_predicts_like_the_service(client, adapter,
                                                                           tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("serving", artifact_location=(tmp_path / "a").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        log_note_model(adapter, LABELS)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    notes = _notes(6) + [NAMED]
    table = model.predict(pd.DataFrame({"text": notes}))
    remote = client.predict(notes)
    assert table["label"].tolist() == [p["label"] for p in remote]
    np.testing.assert_allclose(table["probability"], [p["probability"] for p in remote],
                               atol=1e-5)
    assert list(table.columns) == ["label", "probability"] + [f"p_{k}" for k in LABELS]


def test_the_rate_limit_answers_429_per_client(local):
    settings = ServiceSettings(rate_limit_per_minute=3, tokens=frozenset({TOKEN}))
    with TestClient(create_app(local, settings)) as app:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert app.post("/predict", json={"notes": ["a", "b"]}, headers=headers).status_code == 200
        refused = app.post("/predict", json={"notes": ["c", "d"]}, headers=headers)
        assert refused.status_code == 429 and "3 notes a minute" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        assert app.post("/predict", json={"notes": ["c"]}, headers=headers).status_code == 200


def test_a_streamed_body_over_the_limit_is_a_413_too(local):
    """Without Content-Length (chunked), the limit holds while the body streams in."""
    settings = ServiceSettings(max_request_bytes=10_000, max_encrypted_bytes=20_000)

    def chunks(total: int):
        for _ in range(total // 1000):
            yield b"x" * 1000

    with TestClient(create_app(local, settings)) as app:
        for path, size in (("/predict", 20_000), ("/encrypted/keys", 40_000)):
            response = app.post(path, content=chunks(size),
                                headers={"Content-Type": "application/json"})
            assert response.status_code == 413, (path, response.text)
            assert "over the limit of" in response.json()["detail"]
        assert app.post("/predict", json={"notes": ["chest pain"]}).status_code == 200


@pytest.mark.parametrize(("args", "message"), [
    (["--insecure", "--host", "0.0.0.0"], "only on a loopback address"),
    ([], "TLS needs --tls-cert and --tls-key"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "client authentication needs"),
    (["--insecure", "--token-file", "t"], "drop it to use TLS"),
])
def test_serve_refuses_an_insecure_or_unauthenticated_setup(args, message, capsys):
    with pytest.raises(SystemExit):
        serve_cli.main(["--adapter", "x", *args])
    assert message in capsys.readouterr().err


def test_serve_takes_its_limits_from_the_service_settings():
    args = serve_cli._parser().parse_args(["--adapter", "adapter"])
    assert serve_cli._service_settings(args, frozenset()) == ServiceSettings()


def test_a_token_file_with_a_short_token_is_refused(tmp_path):
    (tmp_path / "tokens").write_text("short\n")
    with pytest.raises(ValueError, match="at least 16 characters"):
        serve_cli.read_tokens(tmp_path / "tokens")


def test_service_errors_carry_the_status(service):
    url, ca = service
    with ServiceClient(url, token="wrong-token-0123456789", ca_cert=ca) as wrong:
        with pytest.raises(ServiceError, match="401"):
            wrong.predict(["chest pain"])


def test_with_client_certificates_only_a_certificate_from_the_ca_gets_in(adapter, tmp_path):
    """--client-ca: the TLS handshake itself refuses a client without a certificate."""
    _deploy("certs.sh", str(tmp_path / "certs"))
    _deploy("client-cert.sh", str(tmp_path / "certs"), "clinic-7")
    pem, key = (str(tmp_path / "certs" / "clients" / f"clinic-7.{ext}") for ext in ("pem", "key"))
    server = _serve(adapter, tmp_path, "--client-ca", str(tmp_path / "certs" / "ca.crt"))
    url, ca = next(server)
    try:
        with ServiceClient(url, ca_cert=ca, client_cert=(pem, key)) as client:
            assert client.predict(["chest pain on exertion"])[0]["label"] in LABELS
        with ServiceClient(url, ca_cert=ca) as anonymous, pytest.raises(httpx.HTTPError):
            anonymous.predict(["chest pain on exertion"])
    finally:
        server.close()


def test_a_decoder_adapter_predicts_in_plain_and_refuses_encryption_clearly(tiny_gpt2,
                                                                            tmp_path):
    """GPT-style heads read every token: plain prediction works, encrypted inference says why
    it cannot."""
    settings = ModelSettings(name_or_path=str(tiny_gpt2), max_length=64)
    model = build_model(settings, LABELS, seed=0)
    decoder = NoteClassifier(save_adapter(model, tmp_path, settings, LABELS, DeidSettings()))
    predictions = decoder.predict(["chest pain", "a cough for weeks"])
    assert len(predictions) == 2 and all(p.label in LABELS for p in predictions)
    with pytest.raises(TaskInputError, match="applies its head to every token"):
        decoder.vectors(["chest pain"])


# -- conventions: OpenAPI, readiness, access log, error shape, metrics (in process) ----------

DISTINCT = "Zanzibar quokka xylophonist reports vertigo"  # words no log line may hold
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def http(local):
    """The service in process (TestClient): one token, /metrics on, ready."""
    app = create_app(local, ServiceSettings(tokens=frozenset({TOKEN}), metrics=True))
    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "the service is ready")
        yield client


def test_openapi_and_docs_answer_without_a_token_and_name_the_bearer_scheme(http):
    schema = http.get("/openapi.json").json()
    bearer = schema["components"]["securitySchemes"]["HTTPBearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer") and bearer["description"]
    assert schema["paths"]["/predict"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]
    invalid = schema["paths"]["/predict"]["post"]["responses"]["422"]
    assert invalid["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert set(schema["components"]["schemas"]["ErrorBody"]["properties"]) == {"detail", "code"}
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/openapi.json" in docs.text


def _error(response: httpx.Response, status: int, code: str) -> str:
    """The one error shape; its detail."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"} and isinstance(body["detail"], str), body
    assert body["code"] == code, body
    return body["detail"]


def test_every_error_has_one_shape_and_a_422_names_fields_not_values(http):
    _error(http.post("/predict", json={"notes": [DISTINCT]}), 401, "unauthorized")
    _error(http.get("/no-such-endpoint", headers=AUTH), 404, "not_found")
    _error(http.get("/predict", headers=AUTH), 405, "method_not_allowed")
    for body in ({"notes": DISTINCT}, {"notes": ["chest pain", {"text": DISTINCT}]},
                 {"note": [DISTINCT]}):
        response = http.post("/predict", json=body, headers=AUTH)
        detail = _error(response, 422, "invalid_request")
        assert "body.note" in detail, detail  # the field is named...
        assert "quokka" not in response.text  # ...the note is not echoed
    detail = _error(http.post("/predict", json={"notes": ["  "]}, headers=AUTH), 422,
                    "invalid_input")
    assert "note 0 is empty" in detail
    _error(http.post("/predict", json={"notes": ["a"] * 257}, headers=AUTH), 413, "too_large")
    _error(http.post("/encrypted/predict", content=b"CFL1", headers=AUTH), 422,
           "invalid_input")


def test_one_access_log_line_per_request_with_its_fields_and_no_note(http, caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    requests = [  # (method, path, json, headers) -> expected fields
        (("POST", "/predict", {"notes": [DISTINCT, "knee pain"]}, AUTH),
         {"endpoint": "/predict", "notes": "2", "status": "200"}),
        (("POST", "/predict", {"notes": [DISTINCT]}, {}),
         {"client": "-", "endpoint": "/predict", "status": "401"}),
        (("POST", "/predict", {"notes": DISTINCT}, AUTH),
         {"endpoint": "/predict", "notes": "0", "status": "422"}),
        (("GET", "/quokka-xylophonist", None, AUTH),
         {"client": "-", "endpoint": "unknown", "status": "404"}),
        (("GET", "/health", None, {}), {"client": "-", "endpoint": "/health", "status": "200"}),
    ]
    for (method, path, body, headers), _fields in requests:
        http.request(method, path, json=body, headers=headers)
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == len(requests), lines
    fingerprint = f"token:{hashlib.sha256(TOKEN.encode()).hexdigest()[:16]}"
    for line, (_request, fields) in zip(lines, requests, strict=True):
        parsed = dict(item.split("=", 1) for item in line.split(" "))
        assert list(parsed) == ["client", "method", "endpoint", "notes", "status", "ms"], line
        assert float(parsed["ms"]) >= 0
        assert {k: parsed[k] for k in fields} == fields, line
    assert lines[0].startswith(f"client={fingerprint} method=POST ")
    for word in ("Zanzibar", "quokka", "xylophonist", TOKEN):  # nowhere in any log line
        assert word not in caplog.text


def test_metrics_count_requests_and_need_the_token(http):
    http.post("/predict", json={"notes": ["chest pain", "cough"]}, headers=AUTH)
    _error(http.get("/metrics"), 401, "unauthorized")
    text = http.get("/metrics", headers=AUTH).text
    counts = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if not line.startswith("#")}
    assert counts['clinical_fl_requests_total{endpoint="/predict",status="200"}'] >= 1
    assert counts['clinical_fl_notes_total{endpoint="/predict"}'] >= 2
    assert counts['clinical_fl_request_seconds_count{endpoint="/predict"}'] >= 1
    assert counts['clinical_fl_requests_total{endpoint="/metrics",status="401"}'] >= 1


def test_a_model_that_cannot_answer_is_not_ready_and_a_crash_is_a_500_without_the_note(
        local, caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    app = create_app(local)  # no /metrics unless asked for

    def broken(notes: list[str]) -> list:
        raise RuntimeError(f"tensor trouble while reading {notes}")

    app.state.batcher._run = broken
    with TestClient(app) as client:
        wait_until(lambda: "failed" in client.get("/ready").text, 30, "the warm-up failed")
        assert "warming up" not in _error(client.get("/ready"), 503, "not_ready")
        assert client.get("/health").json() == {"status": "ok"}
        detail = _error(client.post("/predict", json={"notes": [DISTINCT]}), 500,
                        "internal_error")
        _error(client.get("/metrics"), 404, "not_found")
    assert "quokka" not in detail and "tensor trouble" not in detail
    assert "RuntimeError at" in caplog.text  # where it failed is logged, the message is not
    assert "quokka" not in caplog.text and "tensor trouble" not in caplog.text
    assert "endpoint=/predict notes=1 status=500" in caplog.text


# -- clinical-fl-predict: --json, --top-k, the table's header --------------------------------


def test_predict_cli_json_lines_and_top_k(adapter, local, capsys):
    notes = _notes(3)
    expected = local.predict(notes)
    texts = [arg for note in notes for arg in ("--text", note)]
    assert predict_cli.main(["--adapter", str(adapter), "--json", "--top-k", "2", *texts]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["note"] for r in records] == ["text 1", "text 2", "text 3"]
    for record, prediction in zip(records, expected, strict=True):
        assert record["label"] == prediction.label
        assert record["probability"] == pytest.approx(prediction.probability, abs=1e-5)
        ranked = sorted(prediction.probabilities.items(), key=lambda item: -item[1])[:2]
        assert [(t["label"], pytest.approx(t["probability"], abs=1e-5))
                for t in record["top"]] == ranked
    assert predict_cli.main(["--adapter", str(adapter), "--top-k", "3", *texts[:2]]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split("\t") == ["note", "label", "probability", "label_2", "probability_2",
                                  "label_3", "probability_3"]
    cells = row.split("\t")
    assert cells[:2] == ["text 1", expected[0].label] and len(cells) == 7
    assert float(cells[2]) >= float(cells[4]) >= float(cells[6])
    with pytest.raises(SystemExit):
        predict_cli.main(["--adapter", str(adapter), "--top-k", "0", "--text", "x"])


# -- model URIs: runs:/, models:/NAME@ALIAS, models:/NAME/VERSION -----------------------------

MODEL_NAME = "clinical-fl-note-classifier"


@pytest.fixture(scope="module")
def registry(adapter, tmp_path_factory) -> tuple[str, str, str]:
    """(tracking URI, first run id, second run id): a SQLite MLflow store where version 1 of
    MODEL_NAME (alias 'current') comes from a run holding the adapter and version 2 from
    another run (MLflow's reserved alias 'latest': the newest version)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("serving", artifact_location=(root / "a").as_uri())
    runs = [client.create_run(experiment).info for _ in range(2)]
    client.log_artifacts(runs[0].run_id, str(adapter), "adapter")
    client.create_registered_model(MODEL_NAME)
    for run in runs:
        client.set_terminated(run.run_id)
        client.create_model_version(MODEL_NAME, f"{run.artifact_uri}/adapter", run_id=run.run_id)
    client.set_registered_model_alias(MODEL_NAME, "current", "1")
    return uri, runs[0].run_id, runs[1].run_id


def test_model_uris_resolve_to_the_run_and_unknown_ones_are_named(registry):
    uri, first, second = registry
    for text, run_id in ((f"models:/{MODEL_NAME}@current", first),
                         (f"models:/{MODEL_NAME}/1", first), (f"models:/{MODEL_NAME}/2", second),
                         (f"models:/{MODEL_NAME}@latest", second),
                         (f"models:/{MODEL_NAME}/latest", second),
                         (f"runs:/{first}", first), (f"runs:/{first}/model", first)):
        resolved = run_artifacts.run_of_model(run_artifacts.parse_model_uri(text), uri)
        assert resolved == run_id, text
    for text, named in ((f"models:/{MODEL_NAME}@staging", "no alias 'staging'"),
                        (f"models:/{MODEL_NAME}/7", "no version 7"),
                        ("models:/other-model@current", f"named 'other-model' in the MLflow "
                                                         f"store {uri}; it has {MODEL_NAME}")):
        with pytest.raises(TaskInputError, match=re.escape(named)) as raised:
            run_artifacts.run_of_model(run_artifacts.parse_model_uri(text), uri)
        assert uri in str(raised.value)
    for text in ("models:/x", "models:/x/newest", "runs:/", "file:///tmp/adapter", "x@y"):
        with pytest.raises(argparse.ArgumentTypeError):
            run_artifacts.parse_model_uri(text)


def test_predict_cli_with_a_registered_model_leaves_no_temporary_copy(registry, local,
                                                                     tmp_path, monkeypatch,
                                                                     capsys):
    uri = registry[0]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the download goes
    notes = _notes(2)
    texts = [arg for note in notes for arg in ("--text", note)]
    args = ["--model", f"models:/{MODEL_NAME}@current", "--tracking-uri", uri, "--json", *texts]
    assert predict_cli.main(args) == 0
    labels = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert labels == [p.label for p in local.predict(notes)]
    assert list(tmp_path.iterdir()) == []
    assert predict_cli.main(["--model", f"models:/{MODEL_NAME}@nope", "--tracking-uri", uri,
                             "--text", "x"]) == 2
    assert "no alias 'nope'" in capsys.readouterr().err


def test_serve_with_a_registered_model_and_an_access_log_file(registry, local, tmp_path,
                                                             monkeypatch):
    """clinical-fl-serve --model models:/NAME@ALIAS: the app it would run, asked in process."""
    uri = registry[0]
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    access = logging.getLogger(ACCESS_LOGGER)
    before = list(access.handlers)
    try:
        assert serve_cli.main(["--model", f"models:/{MODEL_NAME}@current", "--tracking-uri", uri,
                               "--insecure", "--access-log", str(tmp_path / "access.log")]) == 0
        with TestClient(served["app"]) as client:
            answer = client.post("/predict", json={"notes": [DISTINCT]}).json()
    finally:
        for handler in set(access.handlers) - set(before):
            access.removeHandler(handler)
            handler.close()
    assert answer["predictions"][0]["label"] == local.predict([DISTINCT])[0].label
    assert list((tmp_path / "tmp").iterdir()) == []  # the download is gone once loaded
    logged = (tmp_path / "access.log").read_text()
    # the in-process client calls itself "testclient", not an IP address: logged as invalid
    assert "client=addr:invalid method=POST endpoint=/predict notes=1 status=200" in logged
    assert "quokka" not in logged
