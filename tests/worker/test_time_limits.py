"""A teacher that never returns must not hold the job worker: real Celery worker processes.

The teacher is a valid ONNX classifier whose ``Loop`` runs 2**62 trips: one
onnxruntime call that practically never ends. Cancelling its job must end it
within seconds, and past the worker's hard time limit the job fails with
``time_budget_exceeded`` while the same worker goes on to run the next job.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from app.config import Settings
from tests.app.conftest import Tenants
from tests.app.databases import REPO
from tests.app.factories import npz_dataset, tiny_onnx_classifier
from tests.app.servers import celery_worker, wait_until
from tests.worker.postgres import database_url, engine  # noqa: F401 - fixtures, by name
from worker.lifecycle import arm_process_deadline

pytestmark = pytest.mark.slow

#: How long a job may take to be claimed and reach its teacher pass (torch imports first).
START_S = 120.0
#: How long a cancelled job may take to end once the request is in.
CANCEL_BOUND_S = 15.0


def forever_classifier(features: int = 4, classes: int = 3) -> bytes:
    """A linear classifier behind a ``Loop`` of 2**62 identity trips, as serialized ONNX."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["x_in"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
    )
    initializers = [
        numpy_helper.from_array(np.ones((features, classes), np.float32), "weight"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "bias"),
        numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "keep_going"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["trips", "keep_going", "input"], ["looped"], body=body),
            helper.make_node("Gemm", ["looped", "weight", "bias"], ["logits"]),
        ],
        "forever",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a job worker on the test's database, broker and storage."""
    return {
        "DISTILL_DATABASE_URL": settings.database_url,
        "DISTILL_BROKER_URL": settings.broker_url,
        "DISTILL_STORAGE_URL": settings.storage_url,
        "DISTILL_WORK_DIR": str(settings.work_dir),
        "DISTILL_DEVICE": "cpu",
        "DISTILL_LEASE_SECONDS": "6",
        **extra,
    }


def submit(client: TestClient, tenants: Tenants, teacher: bytes, **training: Any) -> str:
    """Upload ``teacher`` and a tiny transfer set, submit a job of acme's; its id."""
    model = client.post("/v1/models", headers=tenants.acme, files={"file": ("t.onnx", teacher)})
    dataset = client.post(
        "/v1/datasets", headers=tenants.acme, files={"file": ("d.npz", npz_dataset(rows=120))}
    )
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    body = {
        "teacher_model_id": model.json()["id"],
        "dataset_id": dataset.json()["id"],
        "training": {"epochs": 2, "batch_size": 32, **training},
    }
    response = client.post("/v1/jobs", headers=tenants.acme, json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def job(client: TestClient, tenants: Tenants, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=tenants.acme).json()
    return body


def in_teacher_pass(client: TestClient, tenants: Tenants, job_id: str) -> bool:
    page = client.get(
        f"/v1/jobs/{job_id}/events", headers=tenants.acme, params={"limit": 1000}
    ).json()
    return any(
        e["type"] == "stage" and e["data"].get("stage") == "teacher_outputs" for e in page["data"]
    )


def test_cancel_ends_a_teacher_that_never_returns(
    client: TestClient, tenants: Tenants, settings: Settings, tmp_path: Path
) -> None:
    with celery_worker(worker_env(settings), tmp_path / "worker.log"):
        job_id = submit(client, tenants, forever_classifier(), max_minutes=60)
        wait_until(lambda: in_teacher_pass(client, tenants, job_id), "the teacher pass", START_S)
        asked = time.monotonic()
        response = client.post(f"/v1/jobs/{job_id}/cancel", headers=tenants.acme)
        assert response.status_code in (200, 202), response.text
        wait_until(lambda: job(client, tenants, job_id)["status"] == "cancelled", "cancelled", 60)
        took = time.monotonic() - asked
    assert took < CANCEL_BOUND_S, f"cancellation took {took:.1f} s"
    print(f"cancelled {took:.2f} s after the request")


def test_hard_time_limit_fails_the_job_and_frees_the_worker(
    client: TestClient, tenants: Tenants, settings: Settings, tmp_path: Path
) -> None:
    # No grace: the hard limit is the job's own 3 s, counted from the claim, so it
    # fires before the engine's own budget (counted from the start of the teacher pass).
    env = worker_env(settings, DISTILL_JOB_TIME_LIMIT_GRACE_S="0")
    log = tmp_path / "worker.log"
    with celery_worker(env, log) as worker:
        stuck = submit(client, tenants, forever_classifier(), max_minutes=0.05)
        failed = wait_until(
            lambda: (j := job(client, tenants, stuck))["status"] in ("failed", "cancelled") and j,
            "the stuck job to end",
            START_S,
        )
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "time_budget_exceeded", failed
        assert "hard time limit" in failed["error"]["message"], failed
        # The pool process that ran it was ended; the worker itself runs the next job.
        wait_until(lambda: "exitcode 75" in log.read_text(errors="replace"), "the exit", 30)
        assert worker.poll() is None
        started = time.monotonic()
        after = submit(client, tenants, tiny_onnx_classifier())
        done = wait_until(
            lambda: (j := job(client, tenants, after))["status"] in ("succeeded", "failed") and j,
            "the next job",
            START_S,
        )
        assert done["status"] == "succeeded", done
        print(f"next job succeeded {time.monotonic() - started:.1f} s after submission")


_GIL_HOLDER = """
import ctypes, sys
from billiard.process import current_process
from worker.lifecycle import arm_process_deadline

current_process().name = sys.argv[1]
print(arm_process_deadline(1.0), flush=True)
# libc's sleep through PyDLL: native code that keeps the GIL for 60 s.
ctypes.PyDLL(None).sleep(60)
print("survived", flush=True)
"""


def test_the_kernel_deadline_ends_a_pool_process_whose_native_code_keeps_the_gil() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _GIL_HOLDER, "ForkPoolWorker-1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    took = time.monotonic() - started
    assert done.stdout.strip() == "True", done
    assert done.returncode == -signal.SIGALRM, done
    assert took < 10, took


def test_outside_a_pool_process_no_deadline_is_armed() -> None:
    # Ending the process would end a whole worker (or this test run).
    handler = signal.getsignal(signal.SIGALRM)
    assert arm_process_deadline(1.0) is False
    assert signal.getsignal(signal.SIGALRM) is handler
