"""One access-log line per request, request metrics, and the service's answer to a crash.

    client=token:3f2a9c0d1e2b4a5f method=POST endpoint=/predict notes=8 status=200 ms=41.7

Logged at INFO through the logger ``clinical_fl.access`` (``clinical-fl-serve --access-log
FILE`` adds a file). The fields are fixed, in this order; no field ever holds a note's text, a
vector, a ciphertext, a token or a path the client made up. ``client`` is the credential's
fingerprint (``token:`` and 16 hex digits of its SHA-256), ``addr:<host>`` where the service has
no tokens, ``-`` before authentication succeeded.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from clinical_fl.serving.api_errors import error_response

ACCESS_LOGGER = "clinical_fl.access"
access_log = logging.getLogger(ACCESS_LOGGER)
log = logging.getLogger(__name__)

# request.state keys the endpoints fill in (scope["state"] is the dict behind request.state).
CLIENT, NOTES = "access_client", "access_notes"
# Any other method is the client's own word, logged as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def access_line(client: str, method: str, endpoint: str, notes: int, status: int,
                ms: float) -> str:
    return (f"client={client} method={method} endpoint={endpoint} notes={notes} "
            f"status={status} ms={ms:.1f}")


def describe_failure(err: BaseException) -> str:
    """The exception's type and where it was raised, not its message: a message may quote
    the note that made it fail."""
    frames = traceback.extract_tb(err.__traceback__)[-4:]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(err).__name__} at {where or 'unknown'}"


class Metrics:
    """Request counts, notes and latency per endpoint, in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.notes: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self.timed: Counter[str] = Counter()

    def record(self, endpoint: str, status: int, notes: int, seconds: float) -> None:
        self.requests[endpoint, status] += 1
        self.notes[endpoint] += notes
        self.seconds[endpoint] += seconds
        self.timed[endpoint] += 1

    def text(self) -> str:
        lines = ["# TYPE clinical_fl_requests_total counter"]
        lines += [f'clinical_fl_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines.append("# TYPE clinical_fl_notes_total counter")
        lines += [f'clinical_fl_notes_total{{endpoint="{e}"}} {n}'
                  for e, n in sorted(self.notes.items())]
        lines.append("# TYPE clinical_fl_request_seconds summary")
        for endpoint in sorted(self.timed):
            lines.append(f'clinical_fl_request_seconds_sum{{endpoint="{endpoint}"}} '
                         f"{self.seconds[endpoint]:.6f}")
            lines.append(f'clinical_fl_request_seconds_count{{endpoint="{endpoint}"}} '
                         f"{self.timed[endpoint]}")
        return "\n".join(lines) + "\n"


class AccessLog:
    """ASGI middleware, outermost: it sees every answer (also the body limit's 413s) and turns
    an unhandled exception into a 500 in the one error shape, logging its type and place only."""

    def __init__(self, app: Callable, endpoints: frozenset[str], metrics: Metrics) -> None:
        self.app, self.endpoints, self.metrics = app, endpoints, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        status: int | None = None

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as err:  # noqa: BLE001 - answered here, in the one error shape
            log.error("%s failed: %s", self._endpoint(scope),
                      describe_failure(err))
            if status is None:  # nothing sent yet: the client gets a proper 500
                await error_response(500, "internal error; the service logged where it "
                                          "happened")(scope, receive, send)
            status = 500
        finally:
            self._record(scope, state, status or 500, time.perf_counter() - started)

    def _endpoint(self, scope: dict) -> str:
        """The route's own path; a path no route has is not logged as sent (it is the
        client's text)."""
        path = scope.get("path", "")
        return path if path in self.endpoints else "unknown"

    def _record(self, scope: dict, state: dict, status: int, seconds: float) -> None:
        endpoint, notes = self._endpoint(scope), int(state.get(NOTES, 0))
        self.metrics.record(endpoint, status, notes, seconds)
        method = scope["method"] if scope["method"] in METHODS else "other"
        access_log.info(access_line(state.get(CLIENT, "-"), method, endpoint, notes, status,
                                    1000 * seconds))
