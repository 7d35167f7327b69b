"""Talking to the prediction service from Python.

    client = ServiceClient("https://coordinator:8443", token="...", ca_cert="certs/ca.crt")
    client.predict(["CC: chest pain ..."])               # the service reads the note

    local = NoteClassifier(adapter_dir)                   # the global adapter, held here
    EncryptedPredictor(local, client).predict(notes)     # the service never sees the note

The encrypted path de-identifies and encodes each note here, encrypts the head's input under
a CKKS key that exists only in this process, and decrypts the logits the service returns.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import numpy as np

from clinical_fl.serving import wire
from clinical_fl.serving.ckks_head import ClientKeys, HeadLayout
from tasks.model.predict import NoteClassifier, Prediction


class ServiceError(RuntimeError):
    """The service answered with an error: its status, message and short code (the one error
    shape of clinical_fl/serving/api_errors.py; ``code`` is None where something else
    answered, e.g. a proxy)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"service answered {status}: {message}")
        self.status, self.code = status, code


class ServiceClient:
    def __init__(self, url: str, token: str | None = None, ca_cert: str | Path | None = None,
                 client_cert: tuple[str, str] | None = None, timeout_s: float = 120.0) -> None:
        trust = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
        if client_cert:  # for a service started with --client-ca
            trust.load_cert_chain(*client_cert)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), verify=trust, headers=headers,
                                  timeout=timeout_s)
        self._keys: ClientKeys | None = None
        self._uploaded: str | None = None
        self.bytes_sent = self.bytes_received = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        self.bytes_sent += len(response.request.content or b"")
        self.bytes_received += len(response.content)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise ServiceError(response.status_code, response.text)
            raise ServiceError(response.status_code, str(body.get("detail", response.text)),
                               body.get("code"))
        return response

    def health(self) -> dict:
        return self._call("GET", "/health").json()

    def ready(self) -> dict:
        """{"status": "ready"}; a ServiceError 503 (code not_ready) while it warms up."""
        return self._call("GET", "/ready").json()

    def model(self) -> dict:
        return self._call("GET", "/model").json()

    def predict(self, notes: list[str]) -> list[dict]:
        """Plain prediction: label, probability and all class probabilities per note."""
        return self._call("POST", "/predict", json={"notes": notes}).json()["predictions"]

    def encrypted_logits(self, vectors: np.ndarray, fingerprint: str) -> np.ndarray:
        """Logits of the service's head for ``vectors``, computed on ciphertexts only."""
        spec = self._call("GET", "/encrypted/spec").json()
        layout = HeadLayout.from_dict(spec)
        vectors = np.asarray(vectors, np.float64)
        if vectors.ndim != 2 or vectors.shape[1] != layout.dimension:
            raise ValueError(f"vectors of shape {vectors.shape}; the service's head reads "
                             f"{layout.dimension} values per note")
        if fingerprint != spec["fingerprint"]:
            raise ValueError(f"the local adapter ({fingerprint[:12]}...) is not the service's "
                             f"({spec['fingerprint'][:12]}...); encode with the same adapter")
        if self._keys is None or self._keys.layout != layout:
            self._keys, self._uploaded = ClientKeys(layout), None
        header = {"key_id": self._keys.key_id, "notes": len(vectors), "fingerprint": fingerprint,
                  "dimension": layout.dimension, "classes": layout.classes}
        body = wire.pack(header, self._keys.encrypt(vectors))
        for attempt in range(2):
            if self._uploaded != self._keys.key_id:
                self._call("POST", "/encrypted/keys", content=self._keys.evaluation_keys,
                           headers={"Content-Type": "application/octet-stream"})
                self._uploaded = self._keys.key_id
            try:
                response = self._call("POST", "/encrypted/predict", content=body,
                                      headers={"Content-Type": wire.MEDIA_TYPE})
                break
            except ServiceError as err:  # the service dropped our keys (restart, eviction)
                if err.status != 404 or attempt:
                    raise
                self._uploaded = None
        _answer, blobs = wire.unpack(response.content)
        return self._keys.decrypt(blobs, len(vectors))


class EncryptedPredictor:
    """Encode here, evaluate the head on the service, decrypt here."""

    def __init__(self, encoder: NoteClassifier, client: ServiceClient,
                 batch_size: int = 32) -> None:
        self.encoder, self.client, self.batch_size = encoder, client, batch_size

    def logits(self, notes: list[str]) -> np.ndarray:
        vectors = self.encoder.vectors(notes, self.batch_size)
        return self.client.encrypted_logits(vectors, self.encoder.fingerprint)

    def predict(self, notes: list[str]) -> list[Prediction]:
        return self.encoder.predictions(self.logits(notes))
