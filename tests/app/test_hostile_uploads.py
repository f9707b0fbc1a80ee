"""Crafted uploads the engine's inspection refuses, over HTTP against a real uvicorn:
the answer is a 422 within bounded time and memory, and other tenants are served meanwhile.

The files are built with ``tests/worker/engine/hostile_files.py``; the engine's
own tests check the refusals themselves, these check what the API does with them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from onnx import TensorProto, helper

from tests.app.conftest import Tenants
from tests.app.http import assert_problem
from tests.app.servers import Server, uvicorn_server
from tests.app.test_upload_memory import PeakRss
from tests.worker.engine.hostile_files import Member, crafted_zip

MiB = 1024 * 1024
#: How long the API may take to refuse a crafted upload.
REFUSAL_SECONDS = 10.0

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def server(database_url: str, tenants: Tenants, tmp_path: Path) -> Iterator[Server]:
    """uvicorn on the test's database and storage."""
    env = {
        "DISTILL_DATABASE_URL": database_url,
        "DISTILL_STORAGE_URL": f"file://{tmp_path / 'artifacts'}",
    }
    with uvicorn_server(env, tmp_path / "uvicorn.log") as running:
        yield running


def cyclic_graph() -> bytes:
    """An ONNX graph of two Identity nodes feeding each other (about 113 bytes)."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["b"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
        ],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_a_cyclic_onnx_graph_is_refused_quickly_while_another_tenant_is_served(
    server: Server, tenants: Tenants
) -> None:
    answers: list[httpx.Response | BaseException] = []

    def upload() -> None:
        try:
            answers.append(
                httpx.post(
                    f"{server.base_url}/v1/models",
                    headers=tenants.acme,
                    files={"file": ("loop.onnx", cyclic_graph())},
                    timeout=REFUSAL_SECONDS * 3,
                )
            )
        except BaseException as exc:
            answers.append(exc)

    started = time.perf_counter()
    uploading = threading.Thread(target=upload)
    uploading.start()
    served = httpx.get(f"{server.base_url}/v1/models", headers=tenants.globex, timeout=10)
    assert served.status_code == 200, served.text
    uploading.join(timeout=REFUSAL_SECONDS * 3 + 5)
    seconds = time.perf_counter() - started
    print(f"\n{len(cyclic_graph())}-byte cyclic graph: answered in {seconds:.2f} s")
    assert answers and isinstance(answers[0], httpx.Response), answers
    assert_problem(answers[0], 422, answers[0].json().get("code", ""))
    assert seconds < REFUSAL_SECONDS
    assert httpx.get(f"{server.base_url}/v1/models", headers=tenants.acme).json()["data"] == []


def test_a_zip_whose_model_expands_to_1gib_is_refused_in_bounded_memory(
    server: Server, tenants: Tenants, tmp_path: Path
) -> None:
    # About 500:1, under the ratio cap deflate's maximum (about 1000:1) would allow.
    chunk = bytes(range(256)) * 8 + b"\0" * (MiB - 2048)
    bomb = crafted_zip(tmp_path / "bomb.zip", {"model.onnx": Member(chunk, repeats=1024)})
    # Warm the upload path (auth, the database, the parser, inspection) into the baseline.
    warm = httpx.post(
        f"{server.base_url}/v1/models",
        headers=tenants.acme,
        files={"file": ("w.zip", crafted_zip(tmp_path / "w.zip", {"a.txt": b"a"}).read_bytes())},
    )
    assert 400 <= warm.status_code < 500, warm.text
    baseline = psutil.Process(server.process.pid).memory_info().rss
    started = time.perf_counter()
    with PeakRss(server.process.pid) as rss:
        response = httpx.post(
            f"{server.base_url}/v1/models",
            headers=tenants.acme,
            files={"file": ("bomb.zip", bomb.read_bytes())},
            timeout=60,
        )
    seconds = time.perf_counter() - started
    growth = rss.peak - baseline
    print(
        f"\n{bomb.stat().st_size / MiB:.1f} MiB zip of a 1 GiB member: HTTP "
        f"{response.status_code} in {seconds:.2f} s, API +{growth / MiB:.1f} MiB"
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert growth < 128 * MiB, f"the API grew by {growth / MiB:.1f} MiB"
    served = httpx.get(f"{server.base_url}/v1/models", headers=tenants.globex)
    assert served.status_code == 200
