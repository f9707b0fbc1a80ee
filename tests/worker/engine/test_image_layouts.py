"""Channels-last image inputs: recognised by their declared shape, fed transposed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.worker.engine.factories import write_npz
from worker.engine.compatibility import DataFacts, check_fits
from worker.engine.data import load_transfer_set
from worker.engine.errors import DatasetInvalid
from worker.engine.evaluation.onnx_files import OnnxFile
from worker.engine.layout import channels_last, wants_channels_last
from worker.engine.signature import TeacherSignature, TensorSpec


@pytest.mark.parametrize(
    "dims, expected",
    [
        ([8, 8, 1], True),
        ([224, 224, 3], True),
        (["h", "w", 3], True),
        ([3, 32, 32], False),
        ([1, 8, 8], False),
        ([3, 4, 3], False),  # ambiguous: read channels-first, as torch writes it
        ([8, 8], False),
        ([64], False),
    ],
)
def test_channels_last_is_told_by_the_declared_dims(dims: list[Any], expected: bool) -> None:
    assert channels_last(dims) is expected


def test_only_rows_with_the_inputs_channels_are_transposed() -> None:
    assert wants_channels_last((5, 1, 8, 8), [8, 8, 1])
    assert not wants_channels_last((5, 3, 8, 8), [8, 8, 1])
    assert not wants_channels_last((5, 1, 8, 8), [1, 8, 8])
    assert not wants_channels_last((5, 64), [8, 8, 1])


def _signature(shape: list[Any]) -> TeacherSignature:
    return TeacherSignature(
        format="onnx",
        inputs=[TensorSpec("image", shape, "float32")],
        outputs=[TensorSpec("probabilities", ["N", 10], "float32")],
        parameters=1000,
        bytes=4000,
        task="classification",
    )


def test_a_channels_last_teacher_fits_channels_first_rows_and_says_its_own_shape() -> None:
    rows = DataFacts("image", (1, 8, 8), labelled_rows=0, label_kind=None, num_classes=None)
    check_fits(_signature(["N", 8, 8, 1]), rows)
    with pytest.raises(DatasetInvalid) as raised:
        check_fits(_signature(["N", 16, 16, 1]), rows)
    assert "[16, 16, 1]" in raised.value.message


def test_channels_last_rows_are_held_channels_first_and_fed_back_as_declared(
    tmp_path: Any,
) -> None:
    import onnx
    from onnx import TensorProto, helper

    images = np.random.default_rng(0).random((4, 8, 6, 1)).astype(np.float32)
    held = load_transfer_set(write_npz(tmp_path / "t.npz", images)).arrays["inputs"]
    assert held.shape == (4, 1, 8, 6)
    # An identity graph declared channels-last gets back the rows as they were given.
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 8, 6, 1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 8, 6, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "identity.onnx")
    fed = OnnxFile(tmp_path / "identity.onnx").feeds({"inputs": held})["image"]
    np.testing.assert_array_equal(fed, images)


def test_a_flat_student_of_a_channels_last_teacher_reads_pixels_in_the_order_it_learned(
    tmp_path: Any,
) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from worker.engine.export.dropin import make_dropin

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((6, 5, 3, 2)).astype(np.float32)  # (H, W, C, outputs)

    def linear(name: str, shape: list[Any], w: np.ndarray, out: str) -> onnx.ModelProto:
        flat = helper.make_node("Flatten", [name], ["flat"], axis=1)
        matmul = helper.make_node("MatMul", ["flat", "w"], [out])
        graph = helper.make_graph(
            [flat, matmul],
            "g",
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 2])],
            [numpy_helper.from_array(w.reshape(-1, 2), "w")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    # The teacher flattens (H, W, C); the student learned on rows flattened as (C, H, W).
    onnx.save(linear("image", ["N", 6, 5, 3], weights, "scores"), tmp_path / "teacher.onnx")
    student_weights = weights.transpose(2, 0, 1, 3)
    onnx.save(linear("inputs", ["N", 90], student_weights, "outputs"), tmp_path / "student.onnx")
    signature = TeacherSignature(
        format="onnx",
        inputs=[TensorSpec("image", ["N", 6, 5, 3], "float32")],
        outputs=[TensorSpec("scores", ["N", 2], "float32")],
        parameters=180,
        bytes=720,
        task="regression",
        output="scores",
        output_kind="values",
    )
    make_dropin(tmp_path / "student.onnx", tmp_path / "teacher.onnx", signature)

    images = rng.random((7, 6, 5, 3)).astype(np.float32)
    teacher = ort.InferenceSession(str(tmp_path / "teacher.onnx"))
    student = ort.InferenceSession(str(tmp_path / "student.onnx"))
    assert [i.name for i in student.get_inputs()] == ["image"]
    np.testing.assert_allclose(
        student.run(None, {"image": images})[0],
        teacher.run(None, {"image": images})[0],
        rtol=1e-5,
        atol=1e-5,
    )
