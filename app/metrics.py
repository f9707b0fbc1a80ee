"""Prometheus metrics of the API: request counts and durations, and jobs by status.

:func:`install_metrics` adds a pure ASGI middleware (it passes messages through
untouched, so streamed downloads and Server-Sent Events are never buffered), a
collector that counts jobs per status in the database at scrape time, and
``GET /metrics``. Each application has its own :class:`CollectorRegistry` on
``app.state.metrics_registry``, so several apps in one process never collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.jobs.events import shared_reads_of
from app.jobs.models import STATUSES
from app.jobs.repository import JobRepository

log = logging.getLogger(__name__)

#: The ``route`` label of requests that matched no route (404s on unknown paths).
UNMATCHED = "unmatched"
#: Methods reported by name; anything else is ``other``, so clients cannot add label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Seconds; up to minutes because multi-gigabyte uploads are requests too.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class _RequestMetrics:
    """Pure ASGI middleware: counts each HTTP request and times it until its response ends."""

    def __init__(self, app: ASGIApp, requests: Counter, durations: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.durations = durations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # An app that fails before starting a response is answered 500 by the
        # error middleware outside this one.
        status = 500

        async def send_recording_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = _route_template(scope)
            self.requests.labels(method, route, str(status)).inc()
            self.durations.labels(method, route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    # The router writes the matched route into the (shared) scope; its template,
    # not the concrete path, keeps one label value per endpoint.
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else UNMATCHED


class _JobsCollector:
    """``distillery_jobs{status}``: the number of jobs in each status, counted at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def describe(self) -> Iterator[Metric]:
        # Declares the name to the registry without querying the database.
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        try:
            factory: sessionmaker[Session] = self.app.state.session_factory
            with factory() as session:
                counts = JobRepository(session).count_by_status()
        except Exception as exc:
            # A scrape must still answer (with the request metrics) while the database is down.
            log.warning("metrics: could not count jobs: %s", exc)
            return
        family = self._family()
        for status in STATUSES:
            family.add_metric([status], counts.get(status, 0))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("distillery_jobs", "Jobs in each status.", labels=["status"])


class _EventStreamReads:
    """``distillery_event_stream_reads_total``: database reads made for event streams
    (shared by the streams of a job that wake together, see :mod:`app.jobs.events`)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def describe(self) -> Iterator[Metric]:
        yield self._family(0)

    def collect(self) -> Iterator[Metric]:
        yield self._family(shared_reads_of(self.app).reads)

    @staticmethod
    def _family(value: int) -> CounterMetricFamily:
        return CounterMetricFamily(
            "distillery_event_stream_reads",
            "Database reads of job events made for Server-Sent Event streams.",
            value=value,
        )


def install_metrics(app: FastAPI) -> None:
    """Measure ``app``'s requests and serve them, with jobs by status, at ``GET /metrics``.

    The registry is ``app.state.metrics_registry``. ``/metrics`` needs no API key:
    operators keep it on an internal network (scraped by Prometheus, not exposed
    through the public ingress).
    """
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    requests = Counter(
        "distillery_http_requests_total",
        "HTTP requests by method, route template and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    durations = Histogram(
        "distillery_http_request_duration_seconds",
        "HTTP request duration, until the response's last byte, by method and route template.",
        ["method", "route"],
        buckets=_DURATION_BUCKETS,
        registry=registry,
    )
    registry.register(_JobsCollector(app))
    registry.register(_EventStreamReads(app))
    app.add_middleware(_RequestMetrics, requests=requests, durations=durations)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        response_class=Response,
        include_in_schema=True,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics"}},
    )
    async def metrics(request: Request) -> Response:
        """Request counts and durations, and jobs by status, in Prometheus' text format.

        Unauthenticated: keep it reachable only from the internal network.
        """
        registry: CollectorRegistry = request.app.state.metrics_registry
        # The jobs collector queries the database: off the event loop.
        body = await anyio.to_thread.run_sync(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)
