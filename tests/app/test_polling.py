"""Polling under load against a real uvicorn: no stall, conditional reads, long polls, SSE.

The server runs with a deliberately small pool (two connections, no overflow), so
any request path that holds a connection while it waits on something else
(its body, a thread, another connection) starves it at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.auth.models import ApiKey, Tenant
from app.jobs.models import CANCELLED, FAILED, QUEUED, Job
from app.jobs.repository import JobRepository
from app.jobs.service import change_status
from tests.app.conftest import TEST_MAX_UPLOAD, Tenants
from tests.app.servers import Server, half_sent_upload, uvicorn_server, wait_until

#: The test server's pool: small on purpose.
POOL_SIZE = 2
#: Concurrent pollers, and the requests each sends.
POLLERS = 64
REQUESTS_PER_POLLER = 5
#: Half-sent uploads left open while another tenant polls.
IDLE_UPLOADS = 16


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    """uvicorn on the session's database with a two-connection pool and a 1 s key cache."""
    env = {
        "DISTILL_DATABASE_URL": database_url,
        "DISTILL_STORAGE_URL": f"file://{tmp_path / 'artifacts'}",
        "DISTILL_MAX_UPLOAD_BYTES": str(TEST_MAX_UPLOAD),
        "DISTILL_DATABASE_POOL_SIZE": str(POOL_SIZE),
        "DISTILL_DATABASE_MAX_OVERFLOW": "0",
        "DISTILL_AUTH_CACHE_S": "1",
        "DISTILL_SSE_KEEPALIVE_S": "0.5",
        "DISTILL_SSE_POLL_S": "0.2",
    }
    with uvicorn_server(env, tmp_path / "uvicorn.log") as server:
        yield server


def queued_job(engine: sa.Engine, tenant_name: str) -> str:
    """A queued job of tenant ``tenant_name`` with its first event, as submission writes it."""
    with Session(engine) as session, session.begin():
        tenant = session.scalars(sa.select(Tenant).where(Tenant.name == tenant_name)).one()
        job = Job(
            id=uuid.uuid4(),
            tenant_id=tenant.id,
            status=QUEUED,
            spec={},
            attempt=0,
            partial=False,
            request_sha256="0" * 64,
        )
        session.add(job)
        session.flush()
        JobRepository(session).add_event(job.id, "status", {"status": QUEUED}, attempt=0)
        return str(job.id)


def finish_job(engine: sa.Engine, job_id: str, status: str) -> None:
    """End a queued job from this process, as a worker or another API process would."""
    with Session(engine) as session, session.begin():
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        assert change_status(session, job, status, from_statuses=[QUEUED])


def _require_postgresql(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("pool starvation is a PostgreSQL production concern")


async def _poll_concurrently(base: str, headers: dict[str, str], path: str) -> list[int]:
    limits = httpx.Limits(max_connections=POLLERS, max_keepalive_connections=POLLERS)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=30
    ) as client:

        async def poller() -> list[int]:
            return [(await client.get(path)).status_code for _ in range(REQUESTS_PER_POLLER)]

        answers = await asyncio.gather(*(poller() for _ in range(POLLERS)))
    return [code for codes in answers for code in codes]


def test_64_concurrent_pollers_on_a_two_connection_pool_all_get_answers(
    server: Server, tenants: Tenants, engine: sa.Engine, database_url: str
) -> None:
    _require_postgresql(database_url)
    job_id = queued_job(engine, "acme")
    for path in (f"/v1/jobs/{job_id}", "/v1/jobs?limit=20"):
        codes = asyncio.run(_poll_concurrently(server.base_url, tenants.acme, path))
        assert codes == [200] * (POLLERS * REQUESTS_PER_POLLER), path


def test_idle_half_sent_uploads_do_not_stop_another_tenants_status_reads(
    server: Server, tenants: Tenants, engine: sa.Engine, database_url: str
) -> None:
    _require_postgresql(database_url)
    job_id = queued_job(engine, "globex")
    uploads = [
        half_sent_upload(server.base_url, tenants.acme["Authorization"], TEST_MAX_UPLOAD // 2)
        for _ in range(IDLE_UPLOADS)
    ]
    try:
        with httpx.Client(base_url=server.base_url, headers=tenants.globex, timeout=10) as client:
            for _ in range(20):
                read = client.get(f"/v1/jobs/{job_id}")
                assert read.status_code == 200 and read.json()["status"] == "queued"
            # The uploads' tenant is served too, on reads and on the write path.
            mine = client.get("/v1/models", headers=tenants.acme)
            assert mine.status_code == 200
            assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        # The uploads are still open, waiting on their bodies.
        for sock in uploads:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in uploads:
            sock.close()


def test_a_conditional_read_answers_304_until_the_job_changes(
    server: Server, tenants: Tenants, engine: sa.Engine
) -> None:
    job_id = queued_job(engine, "acme")
    with httpx.Client(base_url=server.base_url, headers=tenants.acme, timeout=10) as client:
        first = client.get(f"/v1/jobs/{job_id}")
        etag = first.headers["etag"]
        same = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
        assert same.status_code == 304 and same.content == b""
        assert same.headers["etag"] == etag
        # Another tenant's job stays hidden, conditional or not.
        other = client.get(f"/v1/jobs/{job_id}", headers={**tenants.globex, "If-None-Match": etag})
        assert other.status_code == 404
        finish_job(engine, job_id, CANCELLED)
        # Another process's change reaches the server's remembered ETag with its notification.
        changed = wait_until(
            lambda: (
                (r := client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})).status_code
                == 200
                and r
            ),
            "the change to be seen",
            1.0,
        )
        assert changed.json()["status"] == "cancelled"
        assert changed.headers["etag"] != etag


# PostgreSQL's feed hears every write of a job; SQLite's reads the event log, so there
# every conditional poll reads the job.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_polls_of_an_unchanged_job_make_no_query(
    app: FastAPI, tenants: Tenants, engine: sa.Engine
) -> None:
    job_id = queued_job(engine, "acme")
    queries: list[str] = []
    with TestClient(app, headers=tenants.acme) as client:
        sa.event.listen(
            app.state.read_engine, "before_cursor_execute", lambda *a: queries.append(a[2])
        )
        wait_until(lambda: app.state.job_feed.live, "the change feed", 10)
        etag = client.get(f"/v1/jobs/{job_id}").headers["etag"]
        assert len(queries) == 1
        first = client.get(f"/v1/jobs/{job_id}").json()
        for _ in range(20):
            same = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
            assert same.status_code == 304 and same.headers["etag"] == etag
            again = client.get(f"/v1/jobs/{job_id}")
            assert again.json() == first and again.headers["etag"] == etag
        assert len(queries) == 1, queries
        # Another tenant is not answered from what acme's read remembered.
        hidden = client.get(f"/v1/jobs/{job_id}", headers={**tenants.globex, "If-None-Match": etag})
        assert hidden.status_code == 404
        # A write of this process is seen by its next read, at once.
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
        changed = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.json()["status"] == "cancelled"


def test_a_long_poll_returns_promptly_when_another_process_changes_the_job(
    server: Server, tenants: Tenants, engine: sa.Engine
) -> None:
    job_id = queued_job(engine, "acme")
    url = f"{server.base_url}/v1/jobs/{job_id}"
    etag = httpx.get(url, headers=tenants.acme).headers["etag"]
    # Nothing changes: the poll waits out its time and answers 304.
    started = time.monotonic()
    idle = httpx.get(url, params={"wait": 1}, headers={**tenants.acme, "If-None-Match": etag})
    assert idle.status_code == 304 and time.monotonic() - started >= 1
    answers: list[httpx.Response] = []
    poll = threading.Thread(
        target=lambda: answers.append(
            httpx.get(
                url,
                params={"wait": 30},
                headers={**tenants.acme, "If-None-Match": etag},
                timeout=40,
            )
        )
    )
    poll.start()
    time.sleep(0.5)  # gives the poll time to reach its wait; it must still be waiting
    assert not answers, "the long poll answered before the job changed"
    changed_at = time.monotonic()
    finish_job(engine, job_id, FAILED)
    poll.join(timeout=35)
    assert answers, "the long poll did not answer"
    assert answers[0].status_code == 200 and answers[0].json()["status"] == "failed"
    assert time.monotonic() - changed_at < 5


def test_an_event_stream_gets_the_terminal_event_written_by_another_process(
    server: Server, tenants: Tenants, engine: sa.Engine
) -> None:
    job_id = queued_job(engine, "acme")
    lines: list[str] = []
    with httpx.Client(base_url=server.base_url, headers=tenants.acme, timeout=30) as client:
        url = f"/v1/jobs/{job_id}/events"
        with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as stream:
            ended_at = 0.0
            for line in stream.iter_lines():
                lines.append(line)
                if line == "event: status":
                    finish_job(engine, job_id, FAILED)
                    ended_at = time.monotonic()
            closed_after = time.monotonic() - ended_at
    assert [line for line in lines if line.startswith("event: ")] == [
        "event: status",
        "event: terminal",
    ]
    assert closed_after < 5


def test_a_revoked_key_stops_working_within_the_cache_lifetime(
    server: Server, tenants: Tenants, engine: sa.Engine
) -> None:
    job_id = queued_job(engine, "acme")
    url = f"{server.base_url}/v1/jobs/{job_id}"
    assert httpx.get(url, headers=tenants.acme).status_code == 200
    key_id = tenants.acme["Authorization"].split("_")[1]
    with Session(engine) as session, session.begin():
        session.execute(
            sa.update(ApiKey).where(ApiKey.key_id == key_id).values(revoked_at=sa.func.now())
        )
    revoked_at = time.monotonic()
    wait_until(
        lambda: httpx.get(url, headers=tenants.acme).status_code == 401, "the key to be refused", 5
    )
    assert time.monotonic() - revoked_at < 3
    assert httpx.get(url, headers=tenants.globex).status_code == 404


#: Followers of one job's event stream.
FOLLOWERS = 200


def _stream_reads(server: Server) -> float:
    metrics = httpx.get(f"{server.base_url}/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("distillery_event_stream_reads_"))
    return float(line.split()[-1])


async def _follow(port: int, request: bytes, ready: asyncio.Event, ended: list[float]) -> None:
    """One SSE follower: ``ready`` once its first event came; notes when the terminal came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
    writer.write(request)
    try:
        while line := await reader.readline():
            if line.startswith(b"event: "):
                ready.set()
            if line.startswith(b"event: terminal"):
                ended.append(time.monotonic())
                return
    finally:
        writer.close()


def test_the_streams_of_one_job_share_one_read_per_change(
    server: Server, tenants: Tenants, engine: sa.Engine
) -> None:
    job_id = queued_job(engine, "acme")
    port = int(server.base_url.rsplit(":", 1)[1])
    request = (
        f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: {tenants.acme['Authorization']}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()

    async def follow_all() -> tuple[float, float, list[float], float]:
        ended: list[float] = []
        readies = [asyncio.Event() for _ in range(FOLLOWERS)]
        tasks = [asyncio.create_task(_follow(port, request, r, ended)) for r in readies]
        async with asyncio.timeout(120):
            await asyncio.gather(*(ready.wait() for ready in readies))
        before = await asyncio.to_thread(_stream_reads, server)
        await asyncio.to_thread(finish_job, engine, job_id, FAILED)
        finished_at = time.monotonic()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
        after = await asyncio.to_thread(_stream_reads, server)
        return before, after, ended, finished_at

    before, after, ended, finished_at = asyncio.run(follow_all())
    delays = sorted(t - finished_at for t in ended)
    print(
        f"{len(ended)} followers: {after - before:.0f} reads for the change; terminal p50 "
        f"{1000 * delays[len(delays) // 2]:.0f} ms, max {1000 * delays[-1]:.0f} ms"
    )
    assert len(ended) == FOLLOWERS
    # One read per change (a follower that woke late may make one more), not one per stream.
    assert after - before <= 5, (before, after)
