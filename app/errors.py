"""Typed errors and the one handler that renders them as RFC 9457 problem+json.

Services raise a :class:`DistilleryError` subclass; :func:`install_error_handlers`
turns it into ``application/problem+json`` with a stable ``code``. Request
validation errors become 422 problems naming the fields, and anything
unexpected becomes a 500 problem that says nothing about the internals.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
_TYPE_BASE = "https://distillery.dev/problems/"

#: Characters of a client's input an error message repeats at most.
MAX_ECHO_CHARS = 200
#: Characters of an error message kept (job errors, events, webhooks, problems).
MAX_MESSAGE_CHARS = 1000
#: A file system path: absolute, or relative with at least two slashes (a storage key such
#: as ``tenants/<id>/models/<id>``); never the path of a URL (after ``:`` or ``/``).
_PATH = re.compile(r"(?<![\w:/.~@+-])(?:(?:/[\w.~@+-]+)+/?|[\w.~@+-]+(?:/[\w.~@+-]+){2,}/?)")


def echo(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """A client's ``text`` to repeat in a message: quoted, and cut to ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"… ({len(text)} characters)"


def public_message(message: str) -> str:
    """``message`` fit to show a client: server paths (which name folders and tenant ids)
    reduced to their last part, and cut to :data:`MAX_MESSAGE_CHARS`."""
    public = _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", message)
    if len(public) > MAX_MESSAGE_CHARS:
        public = public[:MAX_MESSAGE_CHARS] + "…"
    return public


class FieldError(BaseModel):
    """One invalid input: where it is (``body.name``, ``query.limit``, ``file``) and why."""

    field: str
    reason: str


class Problem(BaseModel):
    """An RFC 9457 problem document, as every error response carries."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None


class DistilleryError(Exception):
    """Base of the errors a client can cause: an HTTP ``status`` and a stable ``code``."""

    status = 500
    code = "internal_error"
    title = "Internal server error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.errors = errors
        self.headers = headers or {}

    def problem(self) -> Problem:
        """This error as a problem document."""
        return Problem(
            type=_TYPE_BASE + self.code.replace("_", "-"),
            title=self.title,
            status=self.status,
            detail=self.detail,
            code=self.code,
            errors=self.errors,
        )


class Unauthorized(DistilleryError):
    """No API key, or one that is unknown or revoked."""

    status = 401
    code = "unauthorized"
    title = "Unauthorized"

    def __init__(self, detail: str = "a valid API key is required (Authorization: Bearer …)"):
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="distillery"'})


class NotFound(DistilleryError):
    """No such resource for this tenant (another tenant's resources are not found either)."""

    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(DistilleryError):
    """The request contradicts the resource's state."""

    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLarge(DistilleryError):
    """The upload passed ``DISTILL_MAX_UPLOAD_BYTES``."""

    status = 413
    code = "payload_too_large"
    title = "Payload too large"


def body_too_large(limit: int) -> PayloadTooLarge:
    """The problem of a request body (not an upload) over ``DISTILL_MAX_JSON_BYTES``."""
    return PayloadTooLarge(
        f"the request body is larger than the limit of {limit} bytes", code="body_too_large"
    )


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is being read, once it passes ``limit`` bytes.

    An HTTPException, because FastAPI turns any other error raised while it reads
    a body into a 400; the handler renders it as :func:`body_too_large`.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")
        self.limit = limit


class RequestTimeout(DistilleryError):
    """A request body that went quiet for longer than ``DISTILL_BODY_IDLE_TIMEOUT_S``."""

    status = 408
    code = "body_idle_timeout"
    title = "Request timeout"


class TooManyRequests(DistilleryError):
    """A tenant's quota is used up for now; ``Retry-After`` says when to try again."""

    status = 429
    code = "too_many_requests"
    title = "Too many requests"


class RangeNotSatisfiable(DistilleryError):
    """A ``Range`` that starts past the end of the content."""

    status = 416
    code = "range_not_satisfiable"
    title = "Range not satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(
            f"the requested range is outside the content's {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )


class UnsupportedMediaType(DistilleryError):
    """A file format refused on purpose (pickle-based) or not recognised."""

    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class Unprocessable(DistilleryError):
    """Input that is well-formed HTTP but invalid: a malformed file, a bad field."""

    status = 422
    code = "unprocessable"
    title = "Unprocessable content"


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> JSONResponse:
    """``problem`` as an ``application/problem+json`` response."""
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def responses(*errors: type[DistilleryError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for an endpoint that may raise ``errors``."""
    return {
        e.status: {"model": Problem, "description": e.title, "content": {PROBLEM_JSON: {}}}
        for e in errors
    }


def _field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _distillery_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DistilleryError)
    return problem_response(exc.problem(), exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(field=_field_name(e["loc"])[:MAX_ECHO_CHARS], reason=public_message(e["msg"]))
        for e in exc.errors()
    ]
    fields = ", ".join(e.field for e in errors)
    problem = Unprocessable(f"invalid request: {fields}", code="validation_error", errors=errors)
    return problem_response(problem.problem())


async def _body_too_large(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return problem_response(body_too_large(exc.limit).problem())


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own 404/405 for unknown routes and methods, as problems too.
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    problem = Problem(
        type=_TYPE_BASE + code.replace("_", "-"),
        title=str(exc.detail),
        status=exc.status_code,
        detail=str(exc.detail),
        code=code,
    )
    return problem_response(problem, dict(exc.headers or {}))


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    # Logged with its traceback for operators; the client learns nothing about internals.
    log.exception("unhandled error", exc_info=exc)
    return problem_response(DistilleryError("an unexpected error occurred").problem())


def problem_openapi(app: FastAPI) -> dict[str, Any]:
    """``app``'s OpenAPI schema with every 422 documented as the problem it really is.

    FastAPI documents request validation errors with its own
    ``HTTPValidationError`` shape; :func:`_validation_error` answers with a
    problem instead, so the schema says so.
    """
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        problem = {"$ref": "#/components/schemas/Problem"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                answers = operation.get("responses", {})
                if "422" in answers and "HTTPValidationError" in str(answers["422"]):
                    answers["422"] = {
                        "description": "Unprocessable content: the fields at fault in `errors`",
                        "content": {PROBLEM_JSON: {"schema": problem}},
                    }
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components.setdefault(
            "Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        app.openapi_schema = schema
    return app.openapi_schema


def install_error_handlers(app: FastAPI) -> None:
    """Render every error ``app`` raises as problem+json, and document it so."""
    app.add_exception_handler(DistilleryError, _distillery_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.openapi = lambda: problem_openapi(app)  # type: ignore[method-assign]
