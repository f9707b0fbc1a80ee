"""Submission-time checks: explicit student sizes against the budget and the absolute cap."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest
import torch

from worker.engine import students
from worker.engine.compatibility import (
    AUTO_ARCHITECTURE,
    MAX_STUDENT_PARAMETERS,
    DataFacts,
    StudentShape,
    check_job,
    explicit_student_parameters,
)
from worker.engine.errors import SpecInvalid
from worker.engine.signature import TeacherSignature, TensorSpec
from worker.engine.spec import DistillationSpec, StudentSpec
from worker.engine.students import StudentContext, build_student, count_parameters


def teacher(features: int = 4, classes: int = 3, parameters: int = 15) -> TeacherSignature:
    return TeacherSignature(
        format="onnx",
        inputs=[TensorSpec("input", ["batch", features], "float32")],
        outputs=[TensorSpec("probabilities", ["batch", classes], "float32")],
        parameters=parameters,
        bytes=parameters * 4,
        task="classification",
        output_kind="probabilities",
        num_classes=classes,
        output_dim=classes,
    )


def tabular(features: int = 4) -> DataFacts:
    return DataFacts(
        modality="tabular",
        feature_shape=(features,),
        labelled_rows=60,
        label_kind="class",
        num_classes=3,
    )


def spec(**student: Any) -> DistillationSpec:
    return DistillationSpec.model_validate({"student": student})


@pytest.mark.parametrize(
    ("knobs", "input_shape", "modality"),
    [
        ({"architecture": "mlp", "hidden_sizes": [32, 16, 8]}, (3, 5), "tabular"),
        ({"architecture": "cnn", "channels": [8, 16, 32]}, (3, 16, 16), "image"),
        ({"architecture": "rnn", "hidden_size": 24, "num_layers": 3}, (12, 5), "sequence"),
        (
            {"architecture": "rnn", "hidden_size": 24, "num_layers": 2, "cell": "lstm"},
            (12, 5),
            "sequence",
        ),
        (
            {"architecture": "transformer", "hidden_size": 32, "num_layers": 3, "num_heads": 4},
            (12, 5),
            "sequence",
        ),
    ],
)
def test_estimate_equals_the_built_student(
    knobs: dict[str, Any], input_shape: tuple[int, ...], modality: str
) -> None:
    student_spec = StudentSpec(**knobs)
    ctx = StudentContext(
        task="classification",
        modality=modality,
        input_shape=input_shape,
        input_names=["inputs"],
        output_dim=7,
        teacher_parameters=0,
        teacher_bytes=0,
    )
    with torch.device("meta"):
        built = count_parameters(build_student(student_spec, ctx))
    shape = StudentShape(input_shape=input_shape, output_dim=7, text=False)
    estimate = explicit_student_parameters(student_spec.architecture, student_spec, shape)
    assert estimate is not None and estimate[0] == built


def test_auto_architectures_match_the_students_registry() -> None:
    assert AUTO_ARCHITECTURE == students.AUTO_BY_MODALITY


def test_explicit_sizes_over_max_parameters_are_refused_before_anything_is_built() -> None:
    hostile = spec(architecture="mlp", hidden_sizes=[16384, 16384], max_parameters=10)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(SpecInvalid) as info:
        check_job(hostile, teacher(), tabular())
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert info.value.field == "student.hidden_sizes"
    assert "max_parameters" in info.value.message and "268,582,915" in info.value.message
    assert elapsed < 1.0 and peak < 1 << 20


def test_explicit_sizes_over_the_absolute_cap_are_refused_without_a_budget() -> None:
    hostile = spec(architecture="transformer", hidden_size=16384, num_layers=64, compression=None)
    sequence = DataFacts("sequence", (12, 5), 0, None, None)
    signature = teacher()
    signature.inputs = [TensorSpec("input", ["batch", 12, 5], "float32")]
    with pytest.raises(SpecInvalid) as info:
        check_job(hostile, signature, sequence)
    assert info.value.field == "student.hidden_size"
    assert f"{MAX_STUDENT_PARAMETERS:,}" in info.value.message


def test_auto_with_explicit_sizes_is_held_to_a_named_compression() -> None:
    # auto on tabular data builds an mlp, so its hidden_sizes count.
    with pytest.raises(SpecInvalid) as info:
        check_job(spec(hidden_sizes=[64], compression=2), teacher(parameters=1000), tabular())
    assert info.value.field == "student.hidden_sizes" and "compression" in info.value.message


@pytest.mark.parametrize(
    "student",
    [
        {"architecture": "mlp", "hidden_sizes": [8], "max_parameters": 100},
        # The default compression sizes auto students; explicit sizes are the user's own.
        {"architecture": "mlp", "hidden_sizes": [64, 64]},
        {"architecture": "mlp", "max_parameters": 10},
    ],
)
def test_sizes_within_the_budget_pass(student: dict[str, Any]) -> None:
    assert check_job(spec(**student), teacher(), tabular()) == "classification"


def test_the_transfer_sets_vocabulary_is_refused_for_a_teacher_without_one() -> None:
    with pytest.raises(SpecInvalid) as raised:
        check_job(spec(vocabulary="transfer"), teacher(), tabular())
    assert raised.value.field == "student.vocabulary"
    assert "onnx" in str(raised.value)
    assert check_job(spec(vocabulary="teacher"), teacher(), tabular()) == "classification"


def test_a_number_of_mixed_rows_is_refused_for_data_that_is_not_a_table() -> None:
    sequence = DataFacts(
        modality="sequence",
        feature_shape=(12, 4),
        labelled_rows=0,
        label_kind=None,
        num_classes=None,
    )
    signature = teacher()
    signature.inputs[0] = TensorSpec("input", ["batch", 12, 4], "float32")
    mixed = DistillationSpec.model_validate({"method": {"mixup": 2}})
    with pytest.raises(SpecInvalid) as raised:
        check_job(mixed, signature, sequence)
    assert raised.value.field == "method.mixup" and "sequence" in str(raised.value)
    # "auto" and 0 pass anywhere; a number passes for a table.
    for value in ("auto", 0):
        patched = DistillationSpec.model_validate({"method": {"mixup": value}})
        assert check_job(patched, signature, sequence) == "classification"
    assert check_job(mixed, teacher(), tabular()) == "classification"
