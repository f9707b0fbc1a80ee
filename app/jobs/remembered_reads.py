"""The hot path of polling: a remembered job answered before routing.

Pipelines poll ``GET /v1/jobs/{id}`` far more than anything else, and most polls
find the job as it was. On PostgreSQL the process's :class:`JobChangeFeed`
remembers each job's ETag and JSON until its next change, so such a poll needs
no query; what it still paid for was FastAPI's routing and dependency solving,
three times the cost of the answer itself.

:class:`RememberedJobReads` answers exactly those polls before routing: a plain
``GET`` of one job (no query string), signed by a key the
:class:`~app.auth.key_cache.ApiKeyCache` holds and has not expired, of a job the
feed remembers for that key's tenant. It sends the very ``Response`` the route
would (200 with the JSON, or 304 for a matching ``If-None-Match``, each with the
``ETag`` and ``Cache-Control: no-cache``). Anything else (a long poll, a key to
be read, an unknown, changed or foreign job, a malformed request) goes on to
the route, which decides as it always did.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth.key_cache import ApiKeyCache
from app.jobs.notifications import feed_of
from app.jobs.polling import etag_matches, job_read_headers

_PREFIX = "/v1/jobs/"
#: A job id in its canonical text form (``uuid.UUID`` accepts others; the route takes them).
_UUID_LENGTH = 36


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _bearer_token(scope: Scope) -> str | None:
    raw = _header(scope, b"authorization")
    if raw is None:
        return None
    scheme, _, token = raw.decode("latin-1").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


class RememberedJobReads:
    """Pure ASGI middleware: answers a poll of a remembered job without routing it.

    ``route`` is the ``GET /v1/jobs/{job_id}`` route; it is written into the scope
    (as the router would) so request metrics count these answers under it.
    """

    def __init__(self, app: ASGIApp, *, route: BaseRoute) -> None:
        self.app = app
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer from memory when every condition holds, else pass the request on."""
        response = self._remembered(scope) if scope["type"] == "http" else None
        if response is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        await response(scope, receive, send)

    def _remembered(self, scope: Scope) -> Response | None:
        path: str = scope["path"]
        if (
            scope["method"] != "GET"
            or scope["query_string"]
            or len(path) != len(_PREFIX) + _UUID_LENGTH
            or not path.startswith(_PREFIX)
        ):
            return None
        try:
            job_id = uuid.UUID(path[len(_PREFIX) :])
        except ValueError:
            return None
        token = _bearer_token(scope)
        if token is None:
            return None
        app: Any = scope["app"]
        cache: ApiKeyCache = app.state.api_key_cache
        principal = cache.cached(token)
        if principal is None:
            return None
        feed = feed_of(app)
        raw_tag = _header(scope, b"if-none-match")
        if raw_tag is not None:
            known = feed.recall(job_id, principal.tenant_id, full=False)
            if known is None:
                return None
            if etag_matches(raw_tag.decode("latin-1"), known[0]):
                return Response(status_code=304, headers=job_read_headers(known[0]))
        known = feed.recall(job_id, principal.tenant_id, full=True)
        if known is None or known[2] is None:
            return None
        etag, _status, body = known
        return Response(body, media_type="application/json", headers=job_read_headers(etag))
