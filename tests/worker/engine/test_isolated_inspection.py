"""Large teachers are parsed in a child process that holds the memory, under a cap."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.worker.engine.factories import sklearn_forest_onnx
from worker.engine import isolated
from worker.engine.errors import TeacherInvalid
from worker.engine.inspection import inspect


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def empty_nodes_model(path: Path, nodes: int) -> Path:
    """An ONNX file of ``nodes`` empty nodes: two bytes each on disk, far more parsed."""
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]).SerializeToString()
    graph = b"\x0a\x00" * nodes + b"\x62" + _varint(len(output)) + output  # node*, output
    model = helper.make_model(
        helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ClearField("graph")
    path.write_bytes(model.SerializeToString() + b"\x3a" + _varint(len(graph)) + graph)
    return path


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_millions_of_tiny_nodes_are_refused_by_the_child_under_its_cap(tmp_path: Path) -> None:
    # 10 MB on disk; parsed, about 750 MiB. The cap stops the child's parse, not this process.
    bomb = empty_nodes_model(tmp_path / "bomb.onnx", 5_000_000)
    before = _rss_mib()
    started = time.monotonic()
    with pytest.raises(TeacherInvalid, match="needs more than 300 MiB") as refused:
        isolated.inspect_isolated(bomb, memory_bytes=300 * 2**20, timeout_s=60)
    took = time.monotonic() - started
    grew = _rss_mib() - before
    print(f"refused in {took:.2f} s, caller's peak RSS +{grew:.1f} MiB: {refused.value}")
    assert refused.value.field == "teacher"
    assert grew < 50, grew
    assert took < 30, took


def test_a_child_past_its_time_budget_is_stopped(tmp_path: Path) -> None:
    bomb = empty_nodes_model(tmp_path / "bomb.onnx", 5_000_000)
    with pytest.raises(TeacherInvalid, match="longer than"):
        isolated.inspect_isolated(bomb, timeout_s=0.05)


def test_the_child_reads_a_large_teacher_as_the_process_itself_does(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    path, _ = sklearn_forest_onnx(x, y, tmp_path / "forest.onnx")
    assert path.stat().st_size >= isolated.ISOLATE_FROM_BYTES  # so the child reads it
    assert isolated.inspect_isolated(path) == inspect(path)


def test_engine_errors_come_back_from_the_child_with_their_class_and_field(
    tmp_path: Path,
) -> None:
    # Over the isolation threshold but without outputs: the child's TeacherInvalid, verbatim.
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [],
            initializer=[
                onnx.numpy_helper.from_array(np.zeros(2**19, np.float32), "padding"),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    path = tmp_path / "no_outputs.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(TeacherInvalid) as in_process:
        inspect(path)
    with pytest.raises(TeacherInvalid) as in_child:
        isolated.inspect_isolated(path)
    assert in_child.value.message == in_process.value.message
    assert in_child.value.field == in_process.value.field == "teacher"
