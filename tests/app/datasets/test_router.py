"""/v1/datasets over HTTP (in-process), on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.storage import LocalStorage
from tests.app.conftest import TEST_MAX_UPLOAD, Tenants
from tests.app.databases import count_rows
from tests.app.factories import pickled_checkpoint
from tests.app.http import Response, all_pages, assert_problem, chunked_multipart
from tests.worker.engine.factories import digits, write_jsonl, write_npz, zip_files

#: Digits rows in the test uploads: enough for ten classes, well under the test cap.
ROWS = 120


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The first ``ROWS`` digits with labels, as ``.npz``."""
    x, y = digits()
    return write_npz(tmp_path_factory.mktemp("npz") / "digits.npz", x[:ROWS], y[:ROWS]).read_bytes()


def upload(
    client: TestClient,
    headers: dict[str, str],
    data: bytes,
    filename: str = "digits.npz",
    **fields: str,
) -> Response:
    """POST ``data`` as the multipart ``file``."""
    return client.post(
        "/v1/datasets",
        headers=headers,
        files={"file": (filename, data, "application/octet-stream")},
        data=fields,
    )


def assert_nothing_stored(engine: sa.Engine, storage: LocalStorage) -> None:
    assert count_rows(engine, "datasets") == 0
    assert storage.files() == []


def test_npz_upload_returns_ready_dataset_with_summary(
    client: TestClient, tenants: Tenants, storage: LocalStorage, digits_npz: bytes
) -> None:
    response = upload(client, tenants.acme, digits_npz, name="digits")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["status"] == "ready"
    assert dataset["name"] == "digits"
    assert dataset["filename"] == "digits.npz"
    assert dataset["format"] == "npz" and dataset["rows"] == ROWS
    assert dataset["bytes"] == len(digits_npz)
    summary = dataset["summary"]
    assert summary["format"] == "npz" and summary["rows"] == ROWS
    assert summary["modality"] == "tabular" and summary["feature_shape"] == [64]
    assert summary["has_labels"] and summary["labelled_rows"] == ROWS
    assert summary["label_kind"] == "class" and summary["num_classes"] == 10
    assert summary["bytes"] == len(digits_npz)
    [stored] = storage.files()
    assert stored.endswith(f"/datasets/{dataset['id'].replace('-', '')}")

    fetched = client.get(f"/v1/datasets/{dataset['id']}", headers=tenants.acme)
    assert fetched.status_code == 200
    assert fetched.json() == dataset


def test_csv_round_trip(client: TestClient, tenants: Tenants) -> None:
    rows = ["a,b,label"] + [f"{i},{i * 0.5},{'cat' if i % 2 else 'dog'}" for i in range(30)]
    data = ("\n".join(rows) + "\n").encode()
    dataset = upload(client, tenants.acme, data, filename="pets.csv").json()
    assert dataset["format"] == "csv" and dataset["rows"] == 30
    summary = dataset["summary"]
    assert summary["feature_shape"] == [2]
    assert summary["has_labels"] and summary["num_classes"] == 2
    assert sorted(summary["class_names"]) == ["cat", "dog"]
    content = client.get(f"/v1/datasets/{dataset['id']}/content", headers=tenants.acme)
    assert content.content == data


def test_jsonl_round_trip_without_labels(
    client: TestClient, tenants: Tenants, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "t.jsonl", [f"sentence {i}" for i in range(12)]).read_bytes()
    dataset = upload(client, tenants.acme, data, filename="t.jsonl").json()
    assert dataset["format"] == "jsonl" and dataset["rows"] == 12
    summary = dataset["summary"]
    assert summary["modality"] == "text" and summary["feature_shape"] is None
    assert not summary["has_labels"] and summary["num_classes"] is None
    content = client.get(f"/v1/datasets/{dataset['id']}/content", headers=tenants.acme)
    assert content.content == data


def test_jsonl_with_labels(client: TestClient, tenants: Tenants, tmp_path: Path) -> None:
    texts = [f"sentence {i}" for i in range(9)]
    data = write_jsonl(tmp_path / "t.jsonl", texts, [i % 3 for i in range(9)]).read_bytes()
    summary = upload(client, tenants.acme, data, filename="t.jsonl").json()["summary"]
    assert summary["has_labels"] and summary["num_classes"] == 3


def test_requests_without_a_valid_key_get_401(client: TestClient, tenants: Tenants) -> None:
    for method, path in [
        ("GET", "/v1/datasets"),
        ("GET", "/v1/datasets/x"),
        ("GET", "/v1/datasets/x/content"),
        ("DELETE", "/v1/datasets/x"),
        ("POST", "/v1/datasets"),
    ]:
        response = client.request(method, path, headers={"Authorization": "Bearer dk_0000_nope"})
        assert_problem(response, 401, "unauthorized")
        assert_problem(client.request(method, path), 401, "unauthorized")


def test_another_tenants_dataset_is_not_found_on_every_route(
    client: TestClient,
    tenants: Tenants,
    engine: sa.Engine,
    storage: LocalStorage,
    digits_npz: bytes,
) -> None:
    dataset = upload(client, tenants.acme, digits_npz).json()
    path = f"/v1/datasets/{dataset['id']}"
    for method, route in [("GET", path), ("GET", f"{path}/content"), ("DELETE", path)]:
        assert_problem(
            client.request(method, route, headers=tenants.globex), 404, "dataset_not_found"
        )
    assert client.get("/v1/datasets", headers=tenants.globex).json() == {
        "data": [],
        "next_cursor": None,
    }
    assert count_rows(engine, "datasets") == 1 and len(storage.files()) == 1
    assert client.get(path, headers=tenants.acme).status_code == 200


def test_unknown_and_malformed_ids_are_not_found(client: TestClient, tenants: Tenants) -> None:
    for dataset_id in ("00000000-0000-0000-0000-000000000000", "not-an-id"):
        assert_problem(
            client.get(f"/v1/datasets/{dataset_id}", headers=tenants.acme),
            404,
            "dataset_not_found",
        )


def test_delete_removes_row_and_file(
    client: TestClient,
    tenants: Tenants,
    engine: sa.Engine,
    storage: LocalStorage,
    digits_npz: bytes,
) -> None:
    dataset = upload(client, tenants.acme, digits_npz).json()
    response = client.delete(f"/v1/datasets/{dataset['id']}", headers=tenants.acme)
    assert response.status_code == 204
    assert_nothing_stored(engine, storage)
    assert_problem(
        client.get(f"/v1/datasets/{dataset['id']}", headers=tenants.acme), 404, "dataset_not_found"
    )


def test_over_cap_upload_with_content_length_gets_413_and_leaves_nothing(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    response = upload(client, tenants.acme, b"a,b\n" + b"1,2\n" * (TEST_MAX_UPLOAD // 4))
    assert_problem(response, 413, "upload_too_large")
    assert_nothing_stored(engine, storage)


def test_over_cap_chunked_upload_without_content_length_gets_413(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    response = client.post(
        "/v1/datasets",
        headers={**tenants.acme, "Content-Type": "multipart/form-data; boundary=b0undary"},
        content=chunked_multipart(3 * TEST_MAX_UPLOAD, filename="big.npz"),
    )
    assert_problem(response, 413, "upload_too_large")
    assert_nothing_stored(engine, storage)


def test_npz_without_inputs_gets_422_naming_file(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, features=np.zeros((4, 2), np.float32))
    body = assert_problem(upload(client, tenants.acme, buffer.getvalue()), 422, "dataset_invalid")
    assert body["errors"][0]["field"] == "file"
    assert "inputs" in body["errors"][0]["reason"]
    assert_nothing_stored(engine, storage)


def test_zip_with_an_escaping_member_gets_422_archive_unsafe(
    client: TestClient,
    tenants: Tenants,
    engine: sa.Engine,
    storage: LocalStorage,
    tmp_path: Path,
) -> None:
    data = zip_files(tmp_path / "evil.zip", {"../evil.png": b"\x89PNG\r\n\x1a\n"}).read_bytes()
    body = assert_problem(
        upload(client, tenants.acme, data, filename="evil.zip"), 422, "archive_unsafe"
    )
    assert body["errors"][0]["field"] == "file"
    assert_nothing_stored(engine, storage)


def test_pickle_upload_is_refused_with_the_engines_explanation(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    body = assert_problem(
        upload(client, tenants.acme, pickled_checkpoint(), filename="data.pkl"),
        415,
        "unsupported_format",
    )
    assert "pickle" in body["detail"] and body["errors"][0]["field"] == "file"
    assert_nothing_stored(engine, storage)


def test_missing_file_gets_422_naming_the_field(client: TestClient, tenants: Tenants) -> None:
    body = assert_problem(
        client.post("/v1/datasets", headers=tenants.acme), 422, "validation_error"
    )
    assert body["errors"] == [{"field": "file", "reason": "field required"}]


def test_list_pages_newest_first_with_a_cursor(client: TestClient, tenants: Tenants) -> None:
    ids = [
        upload(client, tenants.acme, f"x,label\n{i},0\n{i + 1},1\n".encode(), "d.csv").json()["id"]
        for i in range(5)
    ]
    upload(client, tenants.globex, b"x\n1\n", "other.csv")
    assert all_pages(client, "/v1/datasets", tenants.acme) == (ids[::-1], 3)


def test_content_has_etag_and_answers_if_none_match_with_304(
    client: TestClient, tenants: Tenants, digits_npz: bytes
) -> None:
    dataset = upload(client, tenants.acme, digits_npz).json()
    url = f"/v1/datasets/{dataset['id']}/content"
    response = client.get(url, headers=tenants.acme)
    assert response.status_code == 200
    assert response.content == digits_npz
    assert response.headers["etag"] == f'"{dataset["sha256"]}"'
    assert response.headers["content-disposition"].startswith('attachment; filename="digits.npz"')
    again = client.get(url, headers={**tenants.acme, "If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_content_ranges_206_and_416(
    client: TestClient, tenants: Tenants, digits_npz: bytes
) -> None:
    dataset = upload(client, tenants.acme, digits_npz).json()
    url = f"/v1/datasets/{dataset['id']}/content"
    size = len(digits_npz)
    response = client.get(url, headers={**tenants.acme, "Range": "bytes=10-99"})
    assert response.status_code == 206
    assert response.content == digits_npz[10:100]
    assert response.headers["content-range"] == f"bytes 10-99/{size}"
    response = client.get(url, headers={**tenants.acme, "Range": f"bytes={size}-"})
    assert_problem(response, 416, "range_not_satisfiable")
    assert response.headers["content-range"] == f"bytes */{size}"
