"""The prediction service (FastAPI): plain predictions and the head on encrypted vectors.

    GET  /health               liveness, no credentials needed, no model details
    GET  /ready                readiness: 200 once a warm-up prediction went through, else 503
    GET  /model                labels, model fingerprint, limits
    POST /predict              {"notes": [...]} -> label and class probabilities per note
    GET  /encrypted/spec       CKKS parameters and packing the client must use
    POST /encrypted/keys       the client's Galois keys (once per client key) -> key id
    POST /encrypted/predict    ciphertexts of note vectors -> ciphertexts of logits
    GET  /metrics              request counts and latencies (only with ServiceSettings.metrics)
    GET  /docs, /openapi.json  the API's description (no data in it, so no credentials needed)

Every other endpoint needs a bearer token when the service has tokens (TLS client certificates
are checked before a request gets here). Every error is ``{"detail": ..., "code": ...}``
(clinical_fl/serving/api_errors.py), every request one access-log line
(clinical_fl/serving/access_log.py). Bad input is
a 4xx with a message saying what was wrong; the service keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import FastAPI, Request, Response, Security
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from clinical_fl.serving import api_errors, wire
from clinical_fl.serving.access_log import CLIENT, NOTES, AccessLog, Metrics, describe_failure
from clinical_fl.serving.api_errors import ApiError, ErrorBody, error_response
from clinical_fl.serving.batcher import MicroBatcher
from clinical_fl.serving.ckks_head import ClientKeys, EncryptedHead, key_id
from tasks.model.predict import NoteClassifier

log = logging.getLogger(__name__)

MiB = 1 << 20
KEY_UPLOADS_PER_MINUTE = 6


@dataclass
class ServiceSettings:
    max_batch: int = 32  # notes per forward pass
    max_wait_ms: float = 5.0  # how long a request waits for others to share its batch
    max_notes: int = 256  # per request
    max_request_bytes: int = 4 * MiB  # /predict bodies
    max_encrypted_bytes: int = 16 * MiB  # /encrypted/* bodies (MiniLM's keys: 8.4 MB)
    key_sessions: int = 32  # clients' Galois keys kept (least recently used dropped)
    keys_per_client: int = 2  # a client replacing its keys evicts its own, nobody else's
    rate_limit_per_minute: int = 0  # notes per client and minute; 0: unlimited
    tokens: frozenset[str] = field(default_factory=frozenset)  # empty: no token check
    # /metrics tells any client about everyone's traffic, which the threat model says no
    # endpoint does: the operator turns it on.
    metrics: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_notes", "max_request_bytes", "max_encrypted_bytes",
                     "key_sessions", "keys_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.max_wait_ms < 0 or self.rate_limit_per_minute < 0:
            raise ValueError("max_wait_ms and rate_limit_per_minute must not be negative")


class PredictRequest(BaseModel):
    notes: list[str]


class NotePrediction(BaseModel):
    label: str
    probability: float
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    predictions: list[NotePrediction]


class ModelInfo(BaseModel):
    labels: list[str]
    fingerprint: str
    max_length: int
    deid: bool
    max_notes: int


class Status(BaseModel):
    status: str


# Raw bodies (not JSON) of the encrypted endpoints, described for the OpenAPI schema.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_KEYS_BODY = {"requestBody": {"required": True,
                              "content": {"application/octet-stream": _BINARY}}}
_CIPHERTEXTS_BODY = {"requestBody": {"required": True, "content": {wire.MEDIA_TYPE: _BINARY}}}
_CIPHERTEXTS_ANSWER = {200: {"content": {wire.MEDIA_TYPE: _BINARY},
                             "description": "ciphertexts of the logits "
                                            "(clinical_fl/serving/wire.py)"}}
# The errors an authenticated endpoint may answer, all in one shape.
_ERRORS = {status: {"model": ErrorBody} for status in (401, 404, 413, 422, 429, 500)}
WARM_UP_NOTE = "Patient reports a mild headache since yesterday; no fever."


class _TooLarge(ApiError):
    """413: an HTTPException, so that FastAPI's body parsing passes it on as it is."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes; send fewer notes "
                              "per request", "too_large")


class _BodyLimit:
    """ASGI middleware: a body over the limit is refused with 413 before it is read whole
    (at once from Content-Length, else while it streams in)."""

    def __init__(self, app: Callable, settings: ServiceSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = (self.settings.max_encrypted_bytes if scope["path"].startswith("/encrypted")
                 else self.settings.max_request_bytes)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(413, _TooLarge(limit).detail, "too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(limit)
            return message

        await self.app(scope, counted, send)


class _RateLimit:
    """Notes per client and minute: the encrypted path's answer to head extraction by many
    queries (and a guard for the plain path)."""

    def __init__(self, per_minute: int, what: str = "notes") -> None:
        self.per_minute, self.what = per_minute, what
        self._seen: dict[str, deque[tuple[float, int]]] = {}

    def charge(self, client: str, notes: int) -> None:
        if self.per_minute <= 0:
            return
        now = time.monotonic()
        window = self._seen.setdefault(client, deque())
        while window and window[0][0] < now - 60:
            window.popleft()
        used = sum(n for _, n in window)
        if used + notes > self.per_minute:
            retry = max(1, int(60 - (now - window[0][0]))) if window else 60
            raise ApiError(429, f"rate limit: {self.per_minute} {self.what} a minute per "
                                f"client; {used} used", headers={"Retry-After": str(retry)})
        window.append((now, notes))


_bearer = HTTPBearer(auto_error=False, description=(
    "One of the service's tokens (clinical-fl-serve --token-file; one line per client, made "
    "by deploy/service-token.sh). Needed by every endpoint but /health, /ready, /docs and "
    "/openapi.json when the service has tokens."))


def _address(request: Request) -> str:
    """The peer's IP address as the access log and the rate limit name a client without a
    token; anything that is not an address (a forged forwarding header behind a proxy
    that trusts it) is ``invalid``, never its text."""
    host = request.client.host if request.client else ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "invalid" if host else "unknown"


def _authenticator(tokens: frozenset[str]) -> Callable:
    """The dependency naming the caller: its token's fingerprint when the service has tokens
    (401 without a known one), else its address (TLS client certificates were checked by then)."""
    known = [token.encode() for token in tokens]

    async def client_of(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Security(_bearer)]) -> str:
        if not known:
            client = "addr:" + _address(request)
        else:
            presented = credentials.credentials.encode() if credentials else b""
            # Every token compared, each in constant time: how long the answer takes says
            # nothing about which token, or how much of one, matched.
            matched = False
            for token in known:
                matched |= hmac.compare_digest(presented, token)
            if not matched:
                raise ApiError(401, "missing or unknown bearer token (Authorization: Bearer "
                                    "<token>)", headers={"WWW-Authenticate": "Bearer"})
            client = "token:" + key_id(presented)[:16]  # never the token itself
        setattr(request.state, CLIENT, client)
        return client

    return client_of


class _Readiness:
    """Ready once one prediction went through the batcher and the model: a loaded model that
    cannot answer (a broken base model, a de-identifier that fails) is not ready."""

    def __init__(self) -> None:
        self.ready = False
        self.problem = "the model is warming up"

    async def warm_up(self, batcher: MicroBatcher) -> None:
        try:
            await batcher.submit([WARM_UP_NOTE])
        except Exception as err:  # noqa: BLE001 - reported by /ready, logged here
            log.error("warm-up prediction failed: %s", describe_failure(err))
            self.problem = "the warm-up prediction failed; the service's log says where"
            return
        self.ready = True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clinical-fl-lora")
    except PackageNotFoundError:
        return "unknown"


def create_app(classifier: NoteClassifier, settings: ServiceSettings | None = None) -> FastAPI:
    """The service for ``classifier``: its routes, error shape and middleware; the model warms
    up in the background once the app starts."""
    settings = settings or ServiceSettings()
    batcher = MicroBatcher(lambda notes: classifier.predict(notes, settings.max_batch),
                           settings.max_batch, settings.max_wait_ms / 1000)
    readiness, metrics = _Readiness(), Metrics()
    # One budget of notes per client, whichever path (plain or encrypted) spends it.
    limiter = _RateLimit(settings.rate_limit_per_minute)

    app = FastAPI(title="clinical-fl prediction service", version=_version(),
                  lifespan=_lifespan(readiness, batcher), description=__doc__,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.batcher = batcher  # tests read its batch count; no endpoint shows it
    api_errors.install(app)
    client_of = _authenticator(settings.tokens)
    _probe_routes(app, readiness)
    _plain_routes(app, classifier, settings, batcher, client_of, limiter)
    _encrypted_routes(app, classifier, settings, client_of, limiter)
    if settings.metrics:
        _metrics_route(app, metrics, client_of)
    _add_middleware(app, settings, metrics)
    return app


def _lifespan(readiness: _Readiness, batcher: MicroBatcher) -> Callable:
    """The app's start and stop: warm up in the background (so /health answers at once and
    /ready once the model has answered), close the batcher on the way out."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        warming = asyncio.create_task(readiness.warm_up(batcher))
        yield
        warming.cancel()
        await batcher.close()

    return lifespan


def _add_middleware(app: FastAPI, settings: ServiceSettings, metrics: Metrics) -> None:
    """After the routes, because the access log names the endpoints it counts by their
    routes; each one added wraps those before it."""
    app.add_middleware(_BodyLimit, settings=settings)
    # Added last, so outermost: it also logs what the body limit refuses.
    app.add_middleware(AccessLog, endpoints=frozenset(r.path for r in app.routes),
                       metrics=metrics)


def _probe_routes(app: FastAPI, readiness: _Readiness) -> None:
    @app.get("/health", response_model=Status)
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", response_model=Status, responses={503: {"model": ErrorBody}})
    async def ready() -> dict:
        if not readiness.ready:
            raise ApiError(503, readiness.problem, "not_ready", headers={"Retry-After": "1"})
        return {"status": "ready"}


def _plain_routes(app: FastAPI, classifier: NoteClassifier, settings: ServiceSettings,
                  batcher: MicroBatcher, client_of: Callable, limiter: _RateLimit) -> None:

    @app.get("/model", response_model=ModelInfo, responses=_ERRORS)
    async def model(_client: str = Security(client_of)) -> dict:
        return {"labels": classifier.labels, "fingerprint": classifier.fingerprint,
                "max_length": classifier.max_length, "deid": classifier.deid.enabled,
                "max_notes": settings.max_notes}

    @app.post("/predict", response_model=PredictResponse, responses=_ERRORS)
    async def predict(body: PredictRequest, request: Request,
                      client: str = Security(client_of)) -> dict:
        setattr(request.state, NOTES, len(body.notes))
        if not body.notes:
            raise ApiError(422, "'notes' is empty; send at least one note")
        if len(body.notes) > settings.max_notes:
            raise ApiError(413, f"{len(body.notes)} notes in one request; at most "
                                f"{settings.max_notes}")
        classifier.check_notes(body.notes)  # here: a bad note fails its own request only
        limiter.charge(client, len(body.notes))
        predictions = await batcher.submit(body.notes)
        return {"predictions": [{"label": p.label, "probability": p.probability,
                                 "probabilities": p.probabilities} for p in predictions]}


def _metrics_route(app: FastAPI, metrics: Metrics, client_of: Callable) -> None:
    @app.get("/metrics", response_class=PlainTextResponse, responses=_ERRORS)
    async def metrics_text(_client: str = Security(client_of)) -> PlainTextResponse:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")


class _KeyStore:
    """The clients' Galois keys, each loaded once per (client, key id) and kept while recently
    used: a client replacing its keys evicts its own (``keys_per_client``), never anybody
    else's, and the store keeps at most ``key_sessions`` in all."""

    def __init__(self, head: EncryptedHead, settings: ServiceSettings,
                 crypto: asyncio.Semaphore) -> None:
        self._head, self._settings, self._crypto = head, settings, crypto
        # Keys of the right kind have one size; anything much larger is not keys for this head.
        self._max_bytes = int(1.25 * len(ClientKeys(head.layout).evaluation_keys))
        self._keys: OrderedDict[tuple[str, str], object] = OrderedDict()  # (client, id) -> keys
        self._uploads = _RateLimit(KEY_UPLOADS_PER_MINUTE, "key uploads")

    async def add(self, client: str, data: bytes) -> str:
        """Keep ``client``'s keys (loading them unless already kept); their key id."""
        if not data:
            raise ApiError(422, "empty body; send the Galois keys made by the client")
        if len(data) > self._max_bytes:
            raise ApiError(413, f"{len(data)} bytes of keys; this head's keys take about "
                                f"{self._max_bytes // 5 * 4} bytes")
        slot = (client, key_id(data))
        if slot not in self._keys:
            self._uploads.charge(client, 1)
            async with self._crypto:
                loaded = await asyncio.to_thread(self._head.load_keys, data)
            mine = [k for k in self._keys if k[0] == client]
            for old in mine[:max(0, len(mine) - self._settings.keys_per_client + 1)]:
                del self._keys[old]
            self._keys[slot] = loaded
            while len(self._keys) > self._settings.key_sessions:
                self._keys.popitem(last=False)
        self._keys.move_to_end(slot)
        return slot[1]

    def get(self, client: str, kept_id: str) -> object | None:
        """``client``'s keys of that id, or None: a client never gets another's keys."""
        return self._keys.get((client, kept_id))


def _declared_notes(header: dict, max_notes: int) -> int:
    """The notes an encrypted request declares, checked against the per-request limit."""
    notes = header.get("notes")
    if type(notes) is not int or not 1 <= notes <= max_notes:
        # what was expected, never the value sent (errors name fields, not values)
        raise ApiError(422, f"header 'notes' must be a count from 1 to "
                            f"{max_notes}; got a {type(notes).__name__}"
                            + (" out of range" if type(notes) is int else ""))
    return notes


def _check_vectors(header: dict, blobs: list[bytes], notes: int, head: EncryptedHead,
                   fingerprint: str) -> None:
    """The ciphertexts were made for this adapter and this head, and as many as ``notes``
    pack into."""
    layout = head.layout
    if header.get("fingerprint") != fingerprint:
        raise ApiError(409, "the vectors were encoded with another adapter; this service "
                            f"serves {fingerprint[:12]}...: use its adapter", "wrong_adapter")
    if header.get("dimension") != layout.dimension or header.get("classes") != layout.classes:
        raise ApiError(422, f"the head reads {layout.dimension} values per note for "
                            f"{layout.classes} classes; the request's header 'dimension' "
                            "or 'classes' differs")
    if len(blobs) != layout.ciphertexts_for(notes):
        raise ApiError(422, f"{notes} notes pack into {layout.ciphertexts_for(notes)} "
                            f"ciphertexts; the request has {len(blobs)}")


def _encrypted_routes(app: FastAPI, classifier: NoteClassifier, settings: ServiceSettings,
                      client_of: Callable, limiter: _RateLimit) -> None:
    weight, bias = classifier.head()
    head = EncryptedHead(weight, bias)
    # SEAL holds the GIL: one encrypted job at a time keeps the event loop answering.
    crypto = asyncio.Semaphore(1)
    keys = _KeyStore(head, settings, crypto)

    @app.get("/encrypted/spec", responses=_ERRORS)
    async def encrypted_spec(_client: str = Security(client_of)) -> dict:
        return {**head.layout.to_dict(), "labels": classifier.labels,
                "fingerprint": classifier.fingerprint}

    @app.post("/encrypted/keys", responses=_ERRORS, openapi_extra=_KEYS_BODY)
    async def encrypted_keys(request: Request, client: str = Security(client_of)) -> dict:
        return {"key_id": await keys.add(client, await request.body())}

    @app.post("/encrypted/predict", response_class=Response,
              responses={**_ERRORS, **_CIPHERTEXTS_ANSWER, 409: {"model": ErrorBody}},
              openapi_extra=_CIPHERTEXTS_BODY)
    async def encrypted_predict(request: Request, client: str = Security(client_of)
                                ) -> Response:
        header, blobs = wire.unpack(await request.body())
        notes = _declared_notes(header, settings.max_notes)
        setattr(request.state, NOTES, notes)  # logged even when a later check refuses
        _check_vectors(header, blobs, notes, head, classifier.fingerprint)
        galois = keys.get(client, str(header.get("key_id")))
        if galois is None:
            raise ApiError(404, "unknown key_id: upload the keys to /encrypted/keys first "
                                "(the service keeps a bounded number of them)", "unknown_key")
        # Blocks past `notes` come back empty, so charging `notes` charges all that is answered.
        limiter.charge(client, notes)
        async with crypto:
            answers = await asyncio.to_thread(head.evaluate, blobs, galois, notes)
        return Response(wire.pack({"notes": notes}, answers), media_type=wire.MEDIA_TYPE)
