"""Hostile requests against a real uvicorn on PostgreSQL: each is refused with a 4xx
problem, within bounded memory and time, while other tenants are served.

Each test reproduces one finding of the hardening issue; the bound it measures is
printed (run with ``-s`` to see it).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.jobs.models import FAILED, QUEUED, Job
from app.jobs.service import change_status
from tests.app.conftest import Tenants
from tests.app.factories import npz_dataset, tiny_onnx_classifier
from tests.app.http import assert_problem
from tests.app.servers import Server, uvicorn_server
from tests.app.test_upload_memory import IO_SECONDS, PeakRss, post_chunked

MiB = 1024 * 1024
JSON_CAP = 1 * MiB

# PostgreSQL is what production runs, and some findings are PostgreSQL's alone.
pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@contextmanager
def _serving(database_url: str, tmp_path: Path, **settings: str) -> Iterator[Server]:
    env = {
        "DISTILL_DATABASE_URL": database_url,
        "DISTILL_STORAGE_URL": f"file://{tmp_path / 'artifacts'}",
        "DISTILL_MAX_JSON_BYTES": str(JSON_CAP),
        **{f"DISTILL_{name.upper()}": value for name, value in settings.items()},
    }
    with uvicorn_server(env, tmp_path / "uvicorn.log") as running:
        yield running


@pytest.fixture
def server(database_url: str, tenants: Tenants, tmp_path: Path) -> Iterator[Server]:
    """uvicorn on the test's database and storage, with the default JSON cap."""
    with _serving(database_url, tmp_path) as running:
        yield running


def _problem(status: int, content_type: str, body: bytes, code: str) -> dict[str, Any]:
    assert 400 <= status < 500, (status, body[:500])
    assert content_type.startswith("application/problem+json"), content_type
    problem = json.loads(body)
    assert problem["code"] == code, problem
    return problem


def _json_chunks(total: int, chunk: int = MiB) -> Iterator[bytes]:
    """A job spec whose ``teacher_model_id`` is ``total`` bytes long, in chunks."""
    yield b'{"teacher_model_id": "'
    for sent in range(0, total, chunk):
        yield b"a" * min(chunk, total - sent)
    yield b'", "dataset_id": "d"}'


def test_a_48mb_json_body_is_refused_with_413_while_it_streams(
    server: Server, tenants: Tenants
) -> None:
    headers = {**tenants.acme, "Content-Type": "application/json"}
    # Warm the path a spec takes (auth, the database, validation) into the baseline.
    warm = httpx.post(f"{server.base_url}/v1/jobs", headers=headers, content=b"{}")
    assert warm.status_code == 422, warm.text
    baseline = psutil.Process(server.process.pid).memory_info().rss
    started = time.perf_counter()
    with PeakRss(server.process.pid) as rss:
        chunked = post_chunked(server.base_url, "/v1/jobs", headers, _json_chunks(48 * MiB))
    seconds = time.perf_counter() - started
    growth = rss.peak - baseline
    print(f"\n48 MB JSON: HTTP {chunked.status} in {seconds:.2f} s, +{growth / MiB:.1f} MiB")
    problem = _problem(chunked.status, chunked.content_type, chunked.body, "body_too_large")
    assert chunked.status == 413 and str(JSON_CAP) in problem["detail"]
    assert not chunked.sent_all, "the server read the whole body before refusing it"
    assert growth < 16 * MiB, f"the API grew by {growth / MiB:.1f} MiB"

    # A declared length over the cap is refused before a byte of the body is read.
    declared = httpx.post(
        f"{server.base_url}/v1/jobs",
        headers={**headers, "Expect": "100-continue"},
        content=b"{" + b" " * (48 * MiB) + b"}",
        timeout=IO_SECONDS,
    )
    assert declared.status_code == 413, declared.text
    assert declared.json()["code"] == "body_too_large"
    # Uploads keep their own, larger cap.
    upload = httpx.post(
        f"{server.base_url}/v1/models",
        headers=tenants.acme,
        files={"file": ("t.onnx", b"\0" * (2 * JSON_CAP))},
        timeout=IO_SECONDS,
    )
    assert upload.status_code != 413, upload.text
    # A spec under the cap is still read and validated.
    small = httpx.post(f"{server.base_url}/v1/jobs", headers=headers, content=b"{}")
    assert small.status_code == 422, small.text


def _upload_teacher(server: Server, headers: dict[str, str], filename: str = "t.onnx") -> str:
    response = httpx.post(
        f"{server.base_url}/v1/models",
        headers=headers,
        files={"file": (filename, tiny_onnx_classifier())},
    )
    assert response.status_code == 201, response.text
    model_id: str = response.json()["id"]
    return model_id


def test_numbers_past_any_bound_in_a_range_or_a_cursor_are_4xx_never_500(
    server: Server, tenants: Tenants
) -> None:
    model_id = _upload_teacher(server, tenants.acme)
    content = f"{server.base_url}/v1/models/{model_id}/content"
    size = len(tiny_onnx_classifier())
    huge = "9" * 5000  # past the 4,300 digits Python parses
    started = time.perf_counter()
    past_end = httpx.get(content, headers={**tenants.acme, "Range": f"bytes={huge}-"})
    assert_problem(past_end, 416, "range_not_satisfiable")
    to_the_end = httpx.get(content, headers={**tenants.acme, "Range": f"bytes=0-{huge}"})
    suffix = httpx.get(content, headers={**tenants.acme, "Range": f"bytes=-{huge}"})
    for whole in (to_the_end, suffix):
        assert whole.status_code == 206, whole.text
        assert whole.headers["Content-Range"] == f"bytes 0-{size - 1}/{size}"
    print(f"\n5,000-digit ranges: 416/206/206 in {time.perf_counter() - started:.2f} s")

    # A cursor dated year 1 at +14:00 lies before the earliest UTC time.
    raw = f"0001-01-01T00:00:00+14:00|{uuid.uuid4().hex}".encode()
    for cursor in (base64.urlsafe_b64encode(raw).decode(), "A" * 5000):
        for path in ("/v1/models", "/v1/datasets", "/v1/jobs"):
            response = httpx.get(
                f"{server.base_url}{path}", headers=tenants.acme, params={"after": cursor}
            )
            body = assert_problem(response, 422, "validation_error")
            assert [e["field"] for e in body["errors"]] == ["query.after"], body
    # A Content-Length of 5,000 digits on an upload.
    answer = _raw_request(
        server,
        f"POST /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: {tenants.acme['Authorization']}"
        f"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {huge}\r\n\r\n",
    )
    assert answer.startswith((b"HTTP/1.1 4",)), answer[:200]


def _raw_request(server: Server, head: str) -> bytes:
    """Send ``head`` as it is over a socket and return the start of the answer."""
    url = httpx.URL(server.base_url)
    assert url.port is not None
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1"))
        return sock.recv(65536)


def _multipart(name: bytes | None, filename: bytes, content: bytes) -> bytes:
    """A multipart body (boundary ``b0undary``) with the bytes of ``name`` and the file name
    as a client may send them, control characters included."""
    parts = []
    if name is not None:
        parts.append(b'Content-Disposition: form-data; name="name"\r\n\r\n' + name)
    parts.append(
        b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content
    )
    return b"".join(b"--b0undary\r\n" + part + b"\r\n" for part in parts) + b"--b0undary--\r\n"


def _post_multipart(server: Server, headers: dict[str, str], body: bytes) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/models",
        headers={**headers, "Content-Type": "multipart/form-data; boundary=b0undary"},
        content=body,
    )


def test_names_with_nul_or_over_255_characters_are_cleaned_or_refused_on_postgresql(
    server: Server, tenants: Tenants
) -> None:
    teacher = tiny_onnx_classifier()
    nul = _post_multipart(server, tenants.acme, _multipart(b"te\0st\x07", b"mo\0del.onnx", teacher))
    assert nul.status_code == 201, nul.text
    assert (nul.json()["name"], nul.json()["filename"]) == ("test", "model.onnx")

    long_name = _post_multipart(server, tenants.acme, _multipart(b"n" * 300, b"t.onnx", teacher))
    body = assert_problem(long_name, 422, "validation_error")
    assert [e["field"] for e in body["errors"]] == ["name"]
    # 255 characters of UTF-8 (more than 255 bytes) and a control character fit.
    widest = ("é" * 255 + "\x1b").encode()
    fits = _post_multipart(server, tenants.acme, _multipart(widest, b"t.onnx", teacher))
    assert fits.status_code == 201, fits.text
    assert fits.json()["name"] == "é" * 255

    # A file name of 1,000 bytes is cut to 255 characters, keeping its extension.
    long_file = _post_multipart(
        server, tenants.acme, _multipart(None, b"f" * 1000 + b".onnx", teacher)
    )
    assert long_file.status_code == 201, long_file.text
    filename = long_file.json()["filename"]
    assert len(filename) == 255 and filename.endswith(".onnx")
    assert long_file.json()["name"] == filename

    listed = httpx.get(f"{server.base_url}/v1/models", headers=tenants.acme)
    assert listed.status_code == 200 and len(listed.json()["data"]) == 3


def test_a_stored_file_name_with_a_line_feed_still_downloads(
    server: Server, tenants: Tenants, engine: sa.Engine
) -> None:
    model_id = _upload_teacher(server, tenants.acme)
    # Rows stored before names were cleaned may hold any character.
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE models SET filename = :name WHERE id = :id"),
            {"name": 'evil\nname"\\é.onnx', "id": uuid.UUID(model_id)},
        )
    content = f"{server.base_url}/v1/models/{model_id}/content"
    for _ in range(2):
        response = httpx.get(content, headers=tenants.acme)
        assert response.status_code == 200, response.text
        assert response.content == tiny_onnx_classifier()
        disposition = response.headers["Content-Disposition"]
        assert disposition == (
            "attachment; filename=\"evilname___.onnx\"; filename*=UTF-8''evilname%22%5C%C3%A9.onnx"
        )


def test_errors_name_no_server_paths_or_tenant_ids_and_echo_input_briefly(
    server: Server, tenants: Tenants, engine: sa.Engine
) -> None:
    unknown = _post_multipart(
        server,
        tenants.acme,
        _multipart(None, b"t.onnx", tiny_onnx_classifier()).replace(
            b'name="file"', b'name="' + b"f" * 4_000 + b'"'
        ),
    )
    body = assert_problem(unknown, 422, "validation_error")
    assert len(unknown.content) < 2_000, len(unknown.content)
    assert body["detail"].startswith("unknown form field 'fff")

    model_id = _upload_teacher(server, tenants.acme)
    dataset = httpx.post(
        f"{server.base_url}/v1/datasets",
        headers=tenants.acme,
        files={"file": ("d.npz", npz_dataset())},
    )
    assert dataset.status_code == 201, dataset.text
    spec = {"teacher_model_id": model_id, "dataset_id": dataset.json()["id"]}
    submitted = httpx.post(f"{server.base_url}/v1/jobs", headers=tenants.acme, json=spec)
    assert submitted.status_code == 202, submitted.text
    job_id = uuid.UUID(submitted.json()["id"])
    # What the runner records when the engine fails on a server path, with the spec echoed.
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        tenant = job.tenant_id.hex
        leak = (
            "the worker failed: FileNotFoundError: [Errno 2] No such file or directory: "
            f"'/srv/distillery/var/work/tenants/{tenant}/jobs/{job_id.hex}/attempt-1/teacher.onnx'"
            f" in tenants/{tenant}/models/{model_id}; spec: " + json.dumps(spec) * 2_000
        )
        error = {"code": "internal_error", "message": leak, "field": None}
        assert change_status(
            session, job, FAILED, from_statuses=[QUEUED], error=error, event={"error": error}
        )
    shown = httpx.get(f"{server.base_url}/v1/jobs/{job_id}", headers=tenants.acme).json()
    events = httpx.get(f"{server.base_url}/v1/jobs/{job_id}/events", headers=tenants.acme).json()
    terminal = events["data"][-1]["data"]["error"]["message"]
    for message in (shown["error"]["message"], terminal):
        assert "/srv" not in message and tenant not in message, message[:300]
        assert "teacher.onnx" in message and len(message) <= 1_001


def _job_inputs(server: Server, headers: dict[str, str]) -> dict[str, str]:
    model_id = _upload_teacher(server, headers)
    dataset = httpx.post(
        f"{server.base_url}/v1/datasets", headers=headers, files={"file": ("d.npz", npz_dataset())}
    )
    assert dataset.status_code == 201, dataset.text
    return {"teacher_model_id": model_id, "dataset_id": dataset.json()["id"]}


def test_a_tenant_past_its_job_quota_gets_429_while_another_is_served(
    database_url: str, tenants: Tenants, tmp_path: Path
) -> None:
    with _serving(database_url, tmp_path, max_active_jobs_per_tenant="2") as server:
        jobs = f"{server.base_url}/v1/jobs"
        spec = _job_inputs(server, tenants.acme)
        first = httpx.post(jobs, headers={**tenants.acme, "Idempotency-Key": "k1"}, json=spec)
        second = httpx.post(jobs, headers=tenants.acme, json=spec)
        assert first.status_code == second.status_code == 202, (first.text, second.text)

        over = httpx.post(jobs, headers=tenants.acme, json=spec)
        assert_problem(over, 429, "job_quota_exceeded")
        assert int(over.headers["Retry-After"]) > 0
        # A replay is not a new job; another tenant has its own quota.
        replay = httpx.post(jobs, headers={**tenants.acme, "Idempotency-Key": "k1"}, json=spec)
        assert replay.status_code == 202 and replay.headers["Idempotent-Replayed"] == "true"
        other = httpx.post(jobs, headers=tenants.globex, json=_job_inputs(server, tenants.globex))
        assert other.status_code == 202, other.text
        # A finished job frees its place.
        cancelled = httpx.post(f"{jobs}/{first.json()['id']}/cancel", headers=tenants.acme)
        assert cancelled.status_code == 202, cancelled.text
        assert httpx.post(jobs, headers=tenants.acme, json=spec).status_code == 202


def test_racing_submissions_never_pass_the_quota(
    database_url: str, tenants: Tenants, tmp_path: Path
) -> None:
    with _serving(database_url, tmp_path, max_active_jobs_per_tenant="2") as server:
        jobs = f"{server.base_url}/v1/jobs"
        spec = _job_inputs(server, tenants.acme)
        barrier = threading.Barrier(8)

        def submit(_: int) -> httpx.Response:
            barrier.wait(timeout=30)
            return httpx.post(jobs, headers=tenants.acme, json=spec, timeout=60)

        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = sorted(r.status_code for r in pool.map(submit, range(8)))
        assert statuses == [202, 202] + [429] * 6, statuses
        listed = httpx.get(jobs, headers=tenants.acme, params={"limit": 100}).json()["data"]
        assert len(listed) == 2
