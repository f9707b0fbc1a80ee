"""/v1/models over HTTP (in-process), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.storage import LocalStorage
from tests.app.conftest import TEST_MAX_UPLOAD, Tenants
from tests.app.databases import count_rows
from tests.app.factories import pickled_checkpoint, tiny_onnx_classifier
from tests.app.http import Response, all_pages, assert_problem, chunked_multipart


def upload(client: TestClient, headers: dict[str, str], data: bytes, **fields: str) -> Response:
    """POST ``data`` as the multipart ``file`` (named teacher.onnx)."""
    return client.post(
        "/v1/models",
        headers=headers,
        files={"file": ("teacher.onnx", data, "application/octet-stream")},
        data=fields,
    )


def assert_nothing_stored(engine: sa.Engine, storage: LocalStorage) -> None:
    assert count_rows(engine, "models") == 0
    assert storage.files() == []


def test_upload_returns_ready_model_with_signature(
    client: TestClient, tenants: Tenants, storage: LocalStorage
) -> None:
    data = tiny_onnx_classifier(features=4, classes=3)
    response = upload(client, tenants.acme, data, name="iris teacher")
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["status"] == "ready"
    assert model["name"] == "iris teacher"
    assert model["filename"] == "teacher.onnx"
    assert model["bytes"] == len(data)
    assert model["format"] == "onnx"
    signature = model["signature"]
    assert signature["inputs"] == [{"name": "input", "shape": ["batch", 4], "dtype": "float32"}]
    assert signature["outputs"][0]["shape"] == ["batch", 3]
    assert signature["parameters"] == 4 * 3 + 3
    assert signature["task"] == "classification"
    [stored] = storage.files()
    assert stored.endswith(f"/models/{model['id'].replace('-', '')}")

    fetched = client.get(f"/v1/models/{model['id']}", headers=tenants.acme)
    assert fetched.status_code == 200
    assert fetched.json() == model


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer dk_0000_nope"}, {"Authorization": "Basic Zm9vOmJhcg=="}],
    ids=["missing", "unknown", "not-bearer"],
)
def test_requests_without_a_valid_key_get_401(
    client: TestClient, tenants: Tenants, headers: dict[str, str]
) -> None:
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/x"), ("POST", "/v1/models")]:
        response = client.request(method, path, headers=headers)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_forged_secret_for_a_real_key_id_gets_401(client: TestClient, tenants: Tenants) -> None:
    token = tenants.acme["Authorization"].removeprefix("Bearer ")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    response = client.get("/v1/models", headers={"Authorization": f"Bearer {forged}"})
    assert_problem(response, 401, "unauthorized")


def test_another_tenants_model_is_not_found_on_every_route(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    model = upload(client, tenants.acme, tiny_onnx_classifier()).json()
    path = f"/v1/models/{model['id']}"
    for method, route in [("GET", path), ("GET", f"{path}/content"), ("DELETE", path)]:
        assert_problem(
            client.request(method, route, headers=tenants.globex), 404, "model_not_found"
        )
    assert client.get("/v1/models", headers=tenants.globex).json() == {
        "data": [],
        "next_cursor": None,
    }
    # Still there for its owner.
    assert count_rows(engine, "models") == 1 and len(storage.files()) == 1
    assert client.get(path, headers=tenants.acme).status_code == 200


def test_unknown_and_malformed_ids_are_not_found(client: TestClient, tenants: Tenants) -> None:
    for model_id in ("00000000-0000-0000-0000-000000000000", "not-an-id"):
        assert_problem(
            client.get(f"/v1/models/{model_id}", headers=tenants.acme), 404, "model_not_found"
        )


def test_delete_removes_row_and_file(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    model = upload(client, tenants.acme, tiny_onnx_classifier()).json()
    response = client.delete(f"/v1/models/{model['id']}", headers=tenants.acme)
    assert response.status_code == 204
    assert_nothing_stored(engine, storage)
    assert_problem(
        client.get(f"/v1/models/{model['id']}", headers=tenants.acme), 404, "model_not_found"
    )


def test_over_cap_upload_with_content_length_gets_413_and_leaves_nothing(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    response = upload(client, tenants.acme, b"\x08\x07" + b"\0" * TEST_MAX_UPLOAD)
    assert_problem(response, 413, "upload_too_large")
    assert_nothing_stored(engine, storage)


def test_over_cap_chunked_upload_without_content_length_gets_413(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    response = client.post(
        "/v1/models",
        headers={**tenants.acme, "Content-Type": "multipart/form-data; boundary=b0undary"},
        content=chunked_multipart(3 * TEST_MAX_UPLOAD, filename="big.onnx"),
    )
    assert_problem(response, 413, "upload_too_large")
    assert_nothing_stored(engine, storage)


def test_far_over_cap_content_length_is_refused_before_reading(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    response = upload(client, tenants.acme, b"\0" * (3 * TEST_MAX_UPLOAD))
    assert_problem(response, 413, "upload_too_large")
    assert_nothing_stored(engine, storage)


def test_pickle_upload_gets_415_with_the_engines_explanation(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    body = assert_problem(
        upload(client, tenants.acme, pickled_checkpoint()), 415, "unsupported_format"
    )
    assert "pickle" in body["detail"] and "ONNX" in body["detail"]
    assert_nothing_stored(engine, storage)


def test_malformed_onnx_gets_422_with_the_engines_code(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    data = tiny_onnx_classifier()
    body = assert_problem(
        upload(client, tenants.acme, data[: len(data) // 2]), 422, "teacher_invalid"
    )
    assert body["errors"][0]["field"] == "file"
    assert_nothing_stored(engine, storage)


def test_missing_file_gets_422_naming_the_field(
    client: TestClient, tenants: Tenants, engine: sa.Engine, storage: LocalStorage
) -> None:
    multipart = client.post("/v1/models", headers=tenants.acme, files={"name": (None, "x")})
    no_body = client.post("/v1/models", headers=tenants.acme)
    for response in (multipart, no_body):
        body = assert_problem(response, 422, "validation_error")
        assert body["errors"] == [{"field": "file", "reason": "field required"}]
    assert_nothing_stored(engine, storage)


def test_non_form_body_gets_415(client: TestClient, tenants: Tenants) -> None:
    response = client.post("/v1/models", headers=tenants.acme, json={"file": "x"})
    assert_problem(response, 415, "multipart_required")


def test_bad_query_parameters_get_422_naming_them(client: TestClient, tenants: Tenants) -> None:
    body = assert_problem(
        client.get("/v1/models?limit=0", headers=tenants.acme), 422, "validation_error"
    )
    assert body["errors"][0]["field"] == "query.limit"
    body = assert_problem(
        client.get("/v1/models?after=garbage", headers=tenants.acme), 422, "validation_error"
    )
    assert body["errors"][0]["field"] == "query.after"


def test_list_pages_newest_first_with_a_cursor(client: TestClient, tenants: Tenants) -> None:
    ids = [
        upload(client, tenants.acme, tiny_onnx_classifier(seed=i), name=f"m{i}").json()["id"]
        for i in range(5)
    ]
    upload(client, tenants.globex, tiny_onnx_classifier())
    assert all_pages(client, "/v1/models", tenants.acme) == (ids[::-1], 3)


def test_content_has_etag_and_answers_if_none_match_with_304(
    client: TestClient, tenants: Tenants
) -> None:
    data = tiny_onnx_classifier()
    model = upload(client, tenants.acme, data).json()
    url = f"/v1/models/{model['id']}/content"
    response = client.get(url, headers=tenants.acme)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["etag"] == f'"{model["sha256"]}"'
    assert response.headers["content-disposition"].startswith('attachment; filename="teacher.onnx"')
    assert response.headers["accept-ranges"] == "bytes"
    again = client.get(url, headers={**tenants.acme, "If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_content_ranges_206_and_416(client: TestClient, tenants: Tenants) -> None:
    data = tiny_onnx_classifier()
    model = upload(client, tenants.acme, data).json()
    url = f"/v1/models/{model['id']}/content"
    size = len(data)
    for header, start, end in [
        ("bytes=0-9", 0, 9),
        ("bytes=10-", 10, size - 1),
        ("bytes=-7", size - 7, size - 1),
        (f"bytes=5-{size + 100}", 5, size - 1),
    ]:
        response = client.get(url, headers={**tenants.acme, "Range": header})
        assert response.status_code == 206, header
        assert response.content == data[start : end + 1]
        assert response.headers["content-range"] == f"bytes {start}-{end}/{size}"
    for header in (f"bytes={size}-", "bytes=-0"):
        response = client.get(url, headers={**tenants.acme, "Range": header})
        assert_problem(response, 416, "range_not_satisfiable")
        assert response.headers["content-range"] == f"bytes */{size}"
    stale = client.get(url, headers={**tenants.acme, "Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200 and stale.content == data
