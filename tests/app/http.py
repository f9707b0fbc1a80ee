"""HTTP helpers of the service tests: problem+json checks and hand-built request bodies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import httpx
from fastapi.testclient import TestClient

from app.errors import PROBLEM_JSON
from tests.app.factories import npz_dataset, tiny_onnx_classifier

if TYPE_CHECKING:
    import httpx2

#: A response of the TestClient (httpx2 under current Starlette) or of a real server (httpx).
Response: TypeAlias = "httpx.Response | httpx2.Response"


def assert_problem(response: Response, status: int, code: str) -> dict[str, Any]:
    """``response`` is a problem+json document with ``status`` and ``code``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert {"type", "title", "detail"} <= body.keys()
    return body


def chunked_multipart(
    payload_bytes: int, filename: str = "big.bin", chunk: int = 64 * 1024
) -> Iterator[bytes]:
    """A multipart body (boundary ``b0undary``) with a ``file`` of zeros, sent without a length."""
    yield (
        b"--b0undary\r\n"
        b'Content-Disposition: form-data; name="file"; filename="' + filename.encode() + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    sent = 0
    while sent < payload_bytes:
        n = min(chunk, payload_bytes - sent)
        yield b"\0" * n
        sent += n
    yield b"\r\n--b0undary--\r\n"


def all_pages(
    client: TestClient, path: str, headers: dict[str, str], limit: int = 2
) -> tuple[list[str], int]:
    """The ids of every item of the list at ``path``, page by page, and the page count."""
    seen: list[str] = []
    after, pages = None, 0
    while True:
        params = {"limit": limit, **({"after": after} if after else {})}
        page = client.get(path, headers=headers, params=params).json()
        seen += [item["id"] for item in page["data"]]
        pages += 1
        after = page["next_cursor"]
        if after is None:
            return seen, pages


def job_inputs(client: TestClient, headers: dict[str, str]) -> dict[str, str]:
    """A teacher and a matching transfer set uploaded for the tenant, as a job spec's two ids."""
    model = client.post(
        "/v1/models", headers=headers, files={"file": ("t.onnx", tiny_onnx_classifier())}
    )
    dataset = client.post("/v1/datasets", headers=headers, files={"file": ("d.npz", npz_dataset())})
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    return {"teacher_model_id": model.json()["id"], "dataset_id": dataset.json()["id"]}
