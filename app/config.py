"""Settings shared by the API, the CLI and the workers: one class, prefix ``DISTILL_``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from fastapi import Depends, Request
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Distillery's configuration, read from ``DISTILL_*`` environment variables.

    The defaults are the embedded setting of ``make serve``: everything lives
    under ``var/`` in the working directory.
    """

    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    database_url: str = "sqlite:///var/distillery.db"
    broker_url: str = "filesystem://"
    storage_url: str = "file://var/artifacts"
    max_upload_bytes: int = 10 * 2**30
    #: Largest request body the API reads whole (JSON job specs); larger ones get 413.
    #: Uploads stream to storage and have their own cap, ``max_upload_bytes``.
    max_json_bytes: int = Field(default=2**20, ge=1024)
    #: An upload whose body sends nothing for this long is answered 408 and dropped, so a
    #: client that goes quiet holds no worker thread, file or connection for long.
    body_idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    #: A request whose headers are not all in this long after its first byte (or after the
    #: connection opened) is answered 408 and its connection closed (app/http_protocol.py).
    header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    #: A request line and headers over this many bytes are answered 431.
    max_header_bytes: int = Field(default=64 * 2**10, ge=4 * 2**10, le=2**24)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Uploads up to this size are inspected by the API before it answers; larger ones are
    #: answered ``processing`` and inspected by a worker.
    inline_inspection_max_bytes: int = 256 * 2**20
    #: Where workers keep a running job's files (checkpoints, outputs) and the teacher cache.
    work_dir: Path = Path("var/work")
    #: Seconds a worker holds a running job without renewing its lease (renewed every third).
    lease_seconds: float = Field(default=60.0, gt=0)
    #: Attempts at a job whose workers keep dying before it fails.
    max_attempts: int = Field(default=3, ge=1)
    #: Seconds between two passes of the reconciler (expired leases, lost messages).
    reconcile_interval_s: float = Field(default=15.0, gt=0)
    #: A queued job or uploaded file changed less than this many seconds ago is never
    #: resent by the reconciler: its message may still be on its way.
    resend_grace_s: float = Field(default=10.0, ge=0)
    #: Seconds between two passes over due webhook deliveries.
    webhook_poll_s: float = Field(default=2.0, gt=0)
    #: Jobs one tenant may have queued, running or cancelling at once; a submission past
    #: it is a 429 with ``Retry-After``.
    max_active_jobs_per_tenant: int = Field(default=20, ge=1)
    #: A server-wide ceiling on ``training.max_minutes``; none by default.
    max_job_minutes: float | None = Field(default=None, gt=0)
    #: Seconds a job attempt may run past its ``training.max_minutes`` (evaluation, export)
    #: before its worker ends it: the job fails with ``time_budget_exceeded`` and the
    #: process running it is terminated.
    job_time_limit_grace_s: float = Field(default=1800.0, ge=0)
    #: Seconds a running job may go without a sign of progress (a step, an event, a
    #: cancellation check) before its worker stops renewing its lease.
    stalled_run_s: float = Field(default=1800.0, gt=0)
    #: Redis re-delivers an unacknowledged message after this long: keep it above the
    #: longest job, or a running job is delivered a second time.
    visibility_timeout_s: int = 48 * 3600
    #: Let webhook URLs reach loopback, private and link-local addresses (the service's own
    #: network); off unless the operator needs it.
    webhook_allow_private: bool = False
    #: Seconds a webhook receiver gets to connect and to answer each read.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    #: Seconds before the first retry of a failed delivery; each further retry waits twice
    #: as long, up to 300 s.
    webhook_retry_base_s: float = Field(default=2.0, ge=0)
    #: Attempts of one delivery before it is given up as failed.
    webhook_max_attempts: int = Field(default=8, ge=1)
    #: Seconds between keep-alive comments on an idle event stream (at most 15).
    sse_keepalive_s: float = Field(default=10.0, gt=0, le=15)
    #: Seconds between the embedded (SQLite) change feed's reads of the event log: one
    #: query per process, however many clients wait (PostgreSQL uses LISTEN/NOTIFY).
    sse_poll_s: float = Field(default=0.5, gt=0, le=5)
    #: Connections each process keeps in its database pool, and how many more it may open
    #: under load. Together they bound the threads that touch the database at once
    #: (:func:`app.db.database_limiter`), so a request never waits on the pool while holding
    #: the thread another needs; keep the API's worker processes (``WEB_CONCURRENCY``) times
    #: their sum, plus the Celery workers' pools, under PostgreSQL's ``max_connections``.
    database_pool_size: int = Field(default=10, ge=1)
    database_max_overflow: int = Field(default=10, ge=0)
    #: Seconds a request waits for a pooled connection before it is answered 503.
    database_pool_timeout_s: float = Field(default=5.0, gt=0)
    #: Requests that may wait for a database thread before more are answered 503.
    database_max_waiting: int = Field(default=1024, ge=1)
    #: Seconds an authenticated API key is trusted without reading it again: a revoked key
    #: stops working within this long.
    auth_cache_s: float = Field(default=1.0, ge=0, le=10)
    #: Whether an API process on PostgreSQL answers reads of a job that has not changed
    #: since it last read it from memory (it hears every change by LISTEN/NOTIFY). Turn
    #: it off where notifications cannot reach the API, e.g. behind a connection pooler
    #: in transaction mode.
    remember_jobs: bool = True

    def storage_root(self) -> Path:
        """The folder of a ``file://`` storage URL (relative URLs are taken from the cwd)."""
        parsed = urlparse(self.storage_url)
        if parsed.scheme != "file":
            raise ValueError(
                f"DISTILL_STORAGE_URL {self.storage_url!r}: only file:// storage is supported yet"
            )
        # file://var/artifacts parses "var" as the host: join it back into a relative path.
        return Path(parsed.netloc + parsed.path)

    def broker_folder(self) -> Path | None:
        """The folder of a ``filesystem://`` broker (``var/broker`` when the URL names none)."""
        parsed = urlparse(self.broker_url)
        if parsed.scheme != "filesystem":
            return None
        return Path(parsed.netloc + parsed.path or "var/broker")


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()


def get_app_settings(request: Request) -> Settings:
    """The settings the application was built with (see :func:`app.main.create_app`)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
