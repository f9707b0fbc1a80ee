"""The names a spec or a signature may hold are exactly the names the registries serve.

spec.py and signature.py stay torch-free (the API imports them), so they cannot
read the registries; these tests hold both lists equal instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

import pytest

# The transformers teacher runtime and the hf_encoder student register on import.
import worker.engine.hf  # noqa: F401
from worker.engine.compatibility import ARCHITECTURE_INPUTS
from worker.engine.data import DATASET_READERS, FORMAT_NAMES
from worker.engine.losses import LOSSES
from worker.engine.signature import TeacherFormat
from worker.engine.spec import Architecture, BuiltinArchitecture, MethodName
from worker.engine.students import STUDENTS
from worker.engine.teachers import TEACHER_RUNTIMES

#: Students the engine builds that a spec cannot name: ``auto`` picks hf_encoder for
#: transformers teachers, and student_config.json rebuilds it.
INTERNAL_STUDENTS = {"hf_encoder"}


def _assert_same(what: str, registered: Iterable[str], declared: Iterable[str]) -> None:
    registered, declared = set(registered), set(declared)
    missing = sorted(declared - registered)
    extra = sorted(registered - declared)
    assert not missing and not extra, (
        f"{what}: declared but not registered {missing}; registered but not declared {extra}"
    )


def test_students_are_the_spec_architectures() -> None:
    _assert_same(
        "student architectures", STUDENTS.names(), {*get_args(Architecture), *INTERNAL_STUDENTS}
    )


def test_builtin_architectures_are_architecture_without_auto() -> None:
    _assert_same(
        "built-in architectures",
        get_args(BuiltinArchitecture),
        set(get_args(Architecture)) - {"auto"},
    )
    _assert_same("architecture inputs", ARCHITECTURE_INPUTS, get_args(BuiltinArchitecture))


def test_losses_are_the_method_names() -> None:
    _assert_same("losses", LOSSES.names(), get_args(MethodName))


def test_teacher_runtimes_are_the_teacher_formats() -> None:
    _assert_same("teacher runtimes", TEACHER_RUNTIMES.names(), get_args(TeacherFormat))


def test_dataset_readers_are_the_described_formats() -> None:
    _assert_same("dataset readers", DATASET_READERS.names(), FORMAT_NAMES)


def test_a_mismatch_names_the_missing_and_extra_names() -> None:
    with pytest.raises(AssertionError) as info:
        _assert_same("losses", ["kd", "mse", "focal"], ["kd", "mse", "hint"])
    assert "declared but not registered ['hint']" in str(info.value)
    assert "registered but not declared ['focal']" in str(info.value)
