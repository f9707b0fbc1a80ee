"""The real thing: uvicorn in a subprocess on a loopback port, spoken to over HTTP with httpx."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from app.storage import LocalStorage
from tests.app.conftest import TEST_MAX_UPLOAD, Tenants
from tests.app.databases import count_rows
from tests.app.factories import tiny_onnx_classifier
from tests.app.servers import uvicorn_server
from tests.worker.engine.factories import digits, sklearn_forest_onnx, write_npz

#: The test server's keep-alive interval on idle event streams (production: at most 15 s).
KEEPALIVE_S = 0.5


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[tuple[str, LocalStorage]]:
    """uvicorn serving ``app.main:app`` on the session's database; yields (base URL, storage)."""
    storage_root = tmp_path / "artifacts"
    env = {
        "DISTILL_DATABASE_URL": database_url,
        "DISTILL_STORAGE_URL": f"file://{storage_root}",
        "DISTILL_MAX_UPLOAD_BYTES": str(TEST_MAX_UPLOAD),
        "DISTILL_SSE_KEEPALIVE_S": str(KEEPALIVE_S),
    }
    with uvicorn_server(env, tmp_path / "uvicorn.log") as server:
        yield server.base_url, LocalStorage(storage_root)


@pytest.fixture(scope="module")
def forest_onnx(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A scikit-learn random forest on digits, converted to ONNX."""
    x, y = digits()
    path, _ = sklearn_forest_onnx(
        x, y, tmp_path_factory.mktemp("teacher") / "forest.onnx", n_estimators=5
    )
    return path.read_bytes()


def test_upload_and_ranged_download_over_real_http(
    server: tuple[str, LocalStorage], tenants: Tenants, forest_onnx: bytes
) -> None:
    base, _ = server
    with httpx.Client(base_url=base, headers=tenants.acme, timeout=30) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        created = client.post(
            "/v1/models", files={"file": ("forest.onnx", forest_onnx)}, data={"name": "forest"}
        )
        assert created.status_code == 201, created.text
        model = created.json()
        assert model["status"] == "ready"
        assert model["sha256"] == hashlib.sha256(forest_onnx).hexdigest()
        assert model["signature"]["task"] == "classification"
        assert model["signature"]["num_classes"] == 10

        url = f"/v1/models/{model['id']}/content"
        size = len(forest_onnx)
        step = max(1, size // 7)
        parts = []
        for start in range(0, size, step):
            end = min(start + step, size) - 1
            part = client.get(url, headers={"Range": f"bytes={start}-{end}"})
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes {start}-{end}/{size}"
            parts.append(part.content)
        assert b"".join(parts) == forest_onnx
        assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416


def test_dataset_upload_and_download_over_real_http(
    server: tuple[str, LocalStorage], tenants: Tenants, tmp_path: Path
) -> None:
    base, storage = server
    x, y = digits()
    data = write_npz(tmp_path / "digits.npz", x[:100], y[:100]).read_bytes()
    with httpx.Client(base_url=base, headers=tenants.acme, timeout=30) as client:
        created = client.post("/v1/datasets", files={"file": ("digits.npz", data)})
        assert created.status_code == 201, created.text
        dataset = created.json()
        assert dataset["rows"] == 100 and dataset["summary"]["num_classes"] == 10
        assert dataset["sha256"] == hashlib.sha256(data).hexdigest()
        content = client.get(f"/v1/datasets/{dataset['id']}/content")
        assert content.status_code == 200 and content.content == data
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert storage.files() == []


def test_chunked_over_cap_upload_gets_413_from_a_real_server(
    server: tuple[str, LocalStorage], tenants: Tenants, engine: sa.Engine
) -> None:
    base, storage = server

    def body() -> Iterator[bytes]:
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n\r\n'
        for _ in range(3 * TEST_MAX_UPLOAD // 65536):
            yield b"\0" * 65536
        yield b"\r\n--xx--\r\n"

    response = httpx.post(
        f"{base}/v1/models",
        headers={**tenants.acme, "Content-Type": "multipart/form-data; boundary=xx"},
        content=body(),
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["code"] == "upload_too_large"
    assert count_rows(engine, "models") == 0
    assert not storage.root.exists() or storage.files() == []


def test_an_idle_event_stream_sends_keep_alives_until_the_job_ends(
    server: tuple[str, LocalStorage], tenants: Tenants, tmp_path: Path
) -> None:
    base, _ = server
    x, y = digits()
    with httpx.Client(base_url=base, headers=tenants.acme, timeout=30) as client:
        model = client.post("/v1/models", files={"file": ("t.onnx", tiny_onnx_classifier(64, 10))})
        dataset = client.post(
            "/v1/datasets",
            files={"file": ("d.npz", write_npz(tmp_path / "d.npz", x[:50], y[:50]).read_bytes())},
        )
        ids = {"teacher_model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}
        job = client.post("/v1/jobs", json=ids).json()  # no worker runs: it stays queued
        url = f"/v1/jobs/{job['id']}/events"
        seen: list[str] = []
        keep_alives = 0
        with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as stream:
            started = time.monotonic()
            for line in stream.iter_lines():
                seen.append(line)
                if line.startswith(":"):
                    keep_alives += 1
                    if keep_alives == 3:
                        # Idle for three intervals, then the job ends: the stream must close.
                        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
                        assert cancelled.json()["status"] == "cancelled"
            elapsed = time.monotonic() - started
        assert keep_alives >= 3
        # Three intervals passed between the first event and the cancellation, no more.
        assert 3 * KEEPALIVE_S <= elapsed < 3 * KEEPALIVE_S + 10
        events = [line for line in seen if line.startswith("event: ")]
        assert events == ["event: status", "event: terminal"]
