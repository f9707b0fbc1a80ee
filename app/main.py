"""The FastAPI application: ``uvicorn app.main:app``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import BaseRoute

from app.auth.key_cache import ApiKeyCache
from app.config import Settings, get_settings
from app.datasets.router import router as datasets_router
from app.db import build_engine, install_database_errors
from app.errors import install_error_handlers
from app.jobs.notifications import JobChangeFeed
from app.jobs.queue import JobQueue
from app.jobs.remembered_reads import RememberedJobReads
from app.jobs.router import get_job
from app.jobs.router import router as jobs_router
from app.metrics import install_metrics
from app.models.router import router as models_router
from app.request_limits import BufferedBodyLimit
from app.storage import LocalStorage
from app.webhooks.router import router as webhooks_router


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application on ``settings`` (the environment's by default)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.job_feed.start(app.state.engine, settings.sse_poll_s)
        try:
            yield
        finally:
            await app.state.job_feed.stop()
            app.state.job_queue.close()
            app.state.engine.dispose()
            app.state.read_engine.dispose()

    app = FastAPI(
        title="Distillery",
        version="0.1.0",
        summary="Distillation as a service: upload a teacher and a transfer set, "
        "get back a smaller evaluated student.",
        lifespan=lifespan,
    )

    def sized_engine(*, autocommit: bool) -> Engine:
        return build_engine(
            settings.database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout_s=settings.database_pool_timeout_s,
            pre_ping=False,
            autocommit=autocommit,
        )

    engine = sized_engine(autocommit=False)
    app.state.settings = settings
    app.state.engine = engine
    # Status reads autocommit on a pool of their own: one round trip per read.
    app.state.read_engine = sized_engine(autocommit=True)
    app.state.session_factory = sessionmaker(engine, expire_on_commit=False)
    app.state.api_key_cache = ApiKeyCache(settings.auth_cache_s)
    app.state.job_feed = JobChangeFeed(remember=settings.remember_jobs)
    app.state.storage = LocalStorage(settings.storage_root())
    app.state.job_queue = JobQueue(settings)
    install_error_handlers(app)
    install_database_errors(app)
    app.include_router(models_router)
    app.include_router(datasets_router)
    app.include_router(jobs_router)
    app.include_router(webhooks_router)
    # Middleware added first runs innermost: the metrics count what the others answer.
    app.add_middleware(RememberedJobReads, route=route_of(jobs_router, get_job))
    app.add_middleware(
        BufferedBodyLimit,
        max_bytes=settings.max_json_bytes,
        streamed=frozenset({("POST", "/v1/models"), ("POST", "/v1/datasets")}),
    )
    install_metrics(app)

    @app.get("/healthz", tags=["health"], summary="Liveness")
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: database, broker and storage",
        responses={503: {"description": "a dependency is unavailable; `checks` names it"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """200 when the database and broker answer and storage can be written, else 503 naming
        what failed."""
        checks = await anyio.to_thread.run_sync(_readiness, request.app)
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    return app


def route_of(router: APIRouter, endpoint: Callable[..., Any]) -> BaseRoute:
    """The route of ``router`` served by ``endpoint``."""
    for route in router.routes:
        if getattr(route, "endpoint", None) is endpoint:
            return route
    raise LookupError(f"no route serves {endpoint.__name__}")


def _readiness(app: FastAPI) -> dict[str, str]:
    checks: dict[str, str] = {}
    factory: sessionmaker[Session] = app.state.session_factory
    try:
        with factory() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        app.state.job_queue.check()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    try:
        app.state.storage.check()
        checks["storage"] = "ok"
    except OSError as exc:
        checks["storage"] = f"unavailable: {type(exc).__name__}"
    return checks


app = create_app()
