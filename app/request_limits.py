"""A cap on request bodies the application buffers (JSON), enforced as the bytes arrive.

FastAPI reads a JSON body whole before validating it, so without a cap a client
could make the API hold any amount of memory. :class:`BufferedBodyLimit`
refuses a declared ``Content-Length`` over the cap before reading a byte, and
stops a chunked body as soon as it passes the cap. Uploads are streamed to
storage in constant memory and keep their own cap (``DISTILL_MAX_UPLOAD_BYTES``),
so their routes pass through.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BodyTooLarge, body_too_large, problem_response

#: A Content-Length with more digits than this is over any cap (and too long to parse cheaply).
_MAX_LENGTH_DIGITS = 18


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            digits = value.strip()
            if not digits.isdigit():
                return None
            return int(digits) if len(digits) <= _MAX_LENGTH_DIGITS else 10**_MAX_LENGTH_DIGITS
    return None


class BufferedBodyLimit:
    """Pure ASGI middleware: 413 problem+json for a body over ``max_bytes``.

    ``streamed`` holds the ``(method, path)`` of the routes that stream their
    body to storage themselves; they are not limited here.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, streamed: frozenset[tuple[str, str]]
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with its body counted; refuse it once it is too large."""
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.streamed:
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = problem_response(body_too_large(self.max_bytes).problem())
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body reading to the
                    # error handlers (anything else becomes a 400 there).
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted_receive, send)
