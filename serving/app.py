"""The prediction service (FastAPI): plain predictions and the head on encrypted vectors.

    GET  /health               liveness, no credentials needed, no model details
    GET  /model                labels, model fingerprint, limits
    POST /predict              {"notes": [...]} -> label and class probabilities per note
    GET  /encrypted/spec       CKKS parameters and packing the client must use
    POST /encrypted/keys       the client's Galois keys (once per client key) -> key id
    POST /encrypted/predict    ciphertexts of note vectors -> ciphertexts of logits

Every endpoint but /health needs a bearer token when the service has tokens (TLS client
certificates are checked before a request gets here). Bad input is a 4xx with a message
saying what was wrong; the service keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from serving import wire
from serving.batcher import MicroBatcher
from serving.ckks_head import ClientKeys, EncryptedHead, EncryptedInputError, key_id
from tasks.errors import TaskInputError
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

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_notes", "max_request_bytes", "max_encrypted_bytes",
                     "key_sessions", "keys_per_client"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.max_wait_ms < 0 or self.rate_limit_per_minute < 0:
            raise ValueError("max_wait_ms and rate_limit_per_minute must not be negative")


class PredictRequest(BaseModel):
    notes: list[str]


class _TooLarge(HTTPException):
    """413: an HTTPException, so that FastAPI's body parsing passes it on as it is."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes; send fewer notes "
                              "per request")


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
            response = JSONResponse({"detail": _TooLarge(limit).detail}, status_code=413)
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
            raise HTTPException(429, f"rate limit: {self.per_minute} {self.what} a minute per "
                                     f"client; {used} used", headers={"Retry-After": str(retry)})
        window.append((now, notes))


def create_app(classifier: NoteClassifier, settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    weight, bias = classifier.head()
    head = EncryptedHead(weight, bias)
    # Keys of the right kind have one size; anything much larger is not keys for this head.
    keys_bytes = int(1.25 * len(ClientKeys(head.layout).evaluation_keys))
    batcher = MicroBatcher(lambda notes: classifier.predict(notes, settings.max_batch),
                           settings.max_batch, settings.max_wait_ms / 1000)
    keys: OrderedDict[tuple[str, str], object] = OrderedDict()  # (client, key id) -> keys
    limiter = _RateLimit(settings.rate_limit_per_minute)
    key_uploads = _RateLimit(KEY_UPLOADS_PER_MINUTE, "key uploads")
    # SEAL holds the GIL: one encrypted job at a time keeps the event loop answering.
    crypto = asyncio.Semaphore(1)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        yield
        await batcher.close()

    app = FastAPI(title="clinical-fl prediction service", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher  # tests read its batch count; no endpoint shows it

    def client_of(request: Request) -> str:
        """The caller's credential: its token when tokens are used, else its address."""
        if not settings.tokens:
            return request.client.host if request.client else "unknown"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.encode(), t.encode())
                                                 for t in settings.tokens):
            raise HTTPException(401, "missing or unknown bearer token (Authorization: Bearer "
                                     "<token>)", headers={"WWW-Authenticate": "Bearer"})
        return "token:" + key_id(token.encode())[:16]

    @app.exception_handler(TaskInputError)
    @app.exception_handler(EncryptedInputError)
    @app.exception_handler(wire.WireError)
    async def bad_input(_request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    async def model(_client: str = Depends(client_of)) -> dict:
        return {"labels": classifier.labels, "fingerprint": classifier.fingerprint,
                "max_length": classifier.max_length, "deid": classifier.deid.enabled,
                "max_notes": settings.max_notes}

    @app.post("/predict")
    async def predict(body: PredictRequest, client: str = Depends(client_of)) -> dict:
        if not body.notes:
            raise HTTPException(422, "'notes' is empty; send at least one note")
        if len(body.notes) > settings.max_notes:
            raise HTTPException(413, f"{len(body.notes)} notes in one request; at most "
                                     f"{settings.max_notes}")
        classifier.check_notes(body.notes)  # here: a bad note fails its own request only
        limiter.charge(client, len(body.notes))
        predictions = await batcher.submit(body.notes)
        return {"predictions": [{"label": p.label, "probability": p.probability,
                                 "probabilities": p.probabilities} for p in predictions]}

    @app.get("/encrypted/spec")
    async def encrypted_spec(_client: str = Depends(client_of)) -> dict:
        return {**head.layout.to_dict(), "labels": classifier.labels,
                "fingerprint": classifier.fingerprint}

    @app.post("/encrypted/keys")
    async def encrypted_keys(request: Request, client: str = Depends(client_of)) -> dict:
        data = await request.body()
        if not data:
            raise HTTPException(422, "empty body; send the Galois keys made by the client")
        if len(data) > keys_bytes:
            raise HTTPException(413, f"{len(data)} bytes of keys; this head's keys take about "
                                     f"{keys_bytes // 5 * 4} bytes")
        slot = (client, key_id(data))
        if slot not in keys:
            key_uploads.charge(client, 1)
            async with crypto:
                loaded = await asyncio.to_thread(head.load_keys, data)
            mine = [k for k in keys if k[0] == client]
            for old in mine[:max(0, len(mine) - settings.keys_per_client + 1)]:
                del keys[old]
            keys[slot] = loaded
            while len(keys) > settings.key_sessions:
                keys.popitem(last=False)
        keys.move_to_end(slot)
        return {"key_id": slot[1]}

    @app.post("/encrypted/predict")
    async def encrypted_predict(request: Request, client: str = Depends(client_of)
                                ) -> Response:
        header, blobs = wire.unpack(await request.body())
        layout = head.layout
        notes = header.get("notes")
        if type(notes) is not int or not 1 <= notes <= settings.max_notes:
            raise HTTPException(422, f"header 'notes' must be a count from 1 to "
                                     f"{settings.max_notes}; got {notes!r}")
        if header.get("fingerprint") != classifier.fingerprint:
            raise HTTPException(409, "the vectors were encoded with another adapter "
                                     f"({str(header.get('fingerprint'))[:12]}...); this service "
                                     f"serves {classifier.fingerprint[:12]}...: use its adapter")
        if header.get("dimension") != layout.dimension or header.get("classes") != layout.classes:
            raise HTTPException(422, f"the head reads {layout.dimension} values per note for "
                                     f"{layout.classes} classes; the request declares "
                                     f"{header.get('dimension')} and {header.get('classes')}")
        if len(blobs) != layout.ciphertexts_for(notes):
            raise HTTPException(422, f"{notes} notes pack into {layout.ciphertexts_for(notes)} "
                                     f"ciphertexts; the request has {len(blobs)}")
        galois = keys.get((client, str(header.get("key_id"))))
        if galois is None:
            raise HTTPException(404, "unknown key_id: upload the keys to /encrypted/keys first "
                                     "(the service keeps a bounded number of them)")
        # Blocks past `notes` come back empty, so charging `notes` charges all that is answered.
        limiter.charge(client, notes)
        async with crypto:
            answers = await asyncio.to_thread(head.evaluate, blobs, galois, notes)
        return Response(wire.pack({"notes": notes}, answers), media_type=wire.MEDIA_TYPE)

    app.add_middleware(_BodyLimit, settings=settings)
    return app

