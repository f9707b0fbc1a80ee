"""Small teachers and upload bodies for the service tests, built here (nothing downloaded)."""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.config import Settings


def tiny_onnx_classifier(features: int = 4, classes: int = 3, seed: int = 0) -> bytes:
    """A linear classifier (Gemm then Softmax) as serialized ONNX, dynamic batch."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(
        rng.standard_normal((features, classes)).astype(np.float32), "weight"
    )
    bias = numpy_helper.from_array(np.zeros(classes, np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "weight", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def pickled_checkpoint() -> bytes:
    """What ``torch.save`` of a state dict starts as: a pickle (protocol 2+)."""
    return pickle.dumps({"weight": [[0.0, 1.0]], "bias": [0.0]}, protocol=4)


def npz_dataset(rows: int = 60, features: int = 4, classes: int | None = 3, seed: int = 0) -> bytes:
    """A transfer set as ``.npz`` bytes: ``inputs`` (rows, features), and labels if ``classes``."""
    rng = np.random.default_rng(seed)
    arrays = {"inputs": rng.standard_normal((rows, features)).astype(np.float32)}
    if classes is not None:
        arrays["labels"] = (np.arange(rows) % classes).astype(np.int64)
    buffer = io.BytesIO()
    # numpy's stub lets **arrays reach savez's allow_pickle: bool; every key here is an array name.
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def broker_folder(settings: Settings) -> Path:
    """The folder of the ``filesystem://`` broker the test's settings name."""
    folder = settings.broker_folder()
    assert folder is not None
    return folder


def queued_tasks(broker_folder: Path) -> list[tuple[str, list[Any]]]:
    """(task name, args) of each message waiting in a ``filesystem://`` broker folder.

    Each message file is kombu's JSON envelope: the task name in its headers, and
    a base64 body holding the task's ``[args, kwargs, embed]``.
    """
    tasks: list[tuple[str, list[Any]]] = []
    paths = sorted((broker_folder / "queue").glob("*.msg"), key=lambda p: p.stat().st_mtime_ns)
    for path in paths:
        envelope = json.loads(path.read_text())
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        assert kwargs == {}
        tasks.append((envelope["headers"]["task"], args))
    return tasks


def queued_job_ids(broker_folder: Path) -> list[str]:
    """The job ids of the ``run_job`` messages waiting in a ``filesystem://`` broker folder."""
    return [args[0] for task, args in queued_tasks(broker_folder) if task == "distillery.run_job"]
