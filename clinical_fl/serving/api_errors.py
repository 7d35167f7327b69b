"""One shape for every error the service answers: ``{"detail": "<message>", "code": "<code>"}``.

``detail`` is always one string meant for a person, ``code`` a short stable word meant for a
program (the table in docs/serving.md). Validation errors name the fields that were wrong and
never the values sent: pydantic's own 422 body echoes each bad ``input``, which here would be a
note's text.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from clinical_fl.serving import wire
from clinical_fl.serving.ckks_head import EncryptedInputError
from tasks.errors import TaskInputError

# Default codes by status; an ApiError may name a more precise one.
CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 409: "conflict", 413: "too_large", 422: "invalid_input",
         429: "rate_limited", 500: "internal_error", 503: "unavailable"}
# A list of 256 wrongly typed notes would otherwise make a message of 256 parts.
MAX_FIELD_ERRORS = 5


class ErrorBody(BaseModel):
    """What every error answers (also in the OpenAPI schema)."""

    detail: str
    code: str


class ApiError(StarletteHTTPException):
    """An HTTP error with a message and, where the status says too little, its own code."""

    def __init__(self, status: int, detail: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail, headers)
        self.code = code or code_for(status)


def code_for(status: int) -> str:
    return CODES.get(status, "client_error" if status < 500 else "server_error")


def error_response(status: int, detail: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(detail=detail, code=code or code_for(status))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def describe_validation(errors: list[dict]) -> str:
    """'invalid request: body.notes: Input should be a valid list' from pydantic's errors,
    from their location and message only (never their ``input`` or ``ctx``)."""
    parts = [f"{'.'.join(str(at) for at in error.get('loc', ())) or 'body'}: "
             f"{error.get('msg', 'invalid')}" for error in errors[:MAX_FIELD_ERRORS]]
    if len(errors) > MAX_FIELD_ERRORS:
        parts.append(f"and {len(errors) - MAX_FIELD_ERRORS} more")
    return "invalid request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    """Route every handled error through ``error_response`` (500s:
    clinical_fl.serving.access_log)."""

    @app.exception_handler(StarletteHTTPException)  # also FastAPI's and the router's 404/405
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), getattr(err, "code", None),
                              err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(422, describe_validation(list(err.errors())), "invalid_request")

    @app.exception_handler(TaskInputError)
    @app.exception_handler(EncryptedInputError)
    @app.exception_handler(wire.WireError)
    async def bad_input(_request: Request, err: Exception) -> JSONResponse:
        return error_response(422, str(err), "invalid_input")
