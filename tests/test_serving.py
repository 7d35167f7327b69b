"""The prediction service as users run it: a real ``clinical-fl-serve`` process on 127.0.0.1
with TLS (certificates from deploy/certs.sh) and a bearer token, started and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from tenseal import sealapi

from fl_app import predict_cli
from serving import cli as serve_cli
from serving import wire
from serving.app import ServiceSettings, create_app
from serving.ckks_head import ClientKeys, HeadLayout
from serving.client import EncryptedPredictor, ServiceClient, ServiceError
from serving.pyfunc import log_note_model
from settings.task import DeidSettings, ModelSettings
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
        [sys.executable, "-m", "serving.cli", "--adapter", str(adapter), "--port", str(port),
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


def test_without_the_token_or_tls_nothing_but_health_answers(service):
    url, ca = service
    assert httpx.get(f"{url}/health", verify=_trust(ca)).json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        for method, path in (("POST", "/predict"), ("GET", "/model"),
                             ("GET", "/encrypted/spec"), ("POST", "/encrypted/keys"),
                             ("POST", "/encrypted/predict")):
            response = httpx.request(method, f"{url}{path}", json={"notes": ["chest pain"]},
                                     headers=headers, verify=_trust(ca))
            assert response.status_code == 401, (method, path, response.text)
            assert "bearer token" in response.json()["detail"]
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
        httpx.get(url.replace("https", "http") + "/health", timeout=5)


def _context(spec: dict) -> sealapi.SEALContext:
    return HeadLayout.from_dict(spec).seal_context()


def _dump(cipher: sealapi.Ciphertext) -> bytes:
    from serving.ckks_head import _Bytes

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
        lines = capsys.readouterr().out.splitlines()
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
