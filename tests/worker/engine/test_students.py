"""Student architectures: shapes, sizing to the budget, and rebuilding from config."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from worker.engine import students
from worker.engine.errors import SpecInvalid
from worker.engine.spec import StudentSpec
from worker.engine.students import STUDENTS, StudentContext, count_parameters, rebuild_student

# The digits teacher of tests/worker/engine/factories.py: 64 -> 256 -> 256 -> 10.
DIGITS_TEACHER_PARAMETERS = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


def build_student(spec: StudentSpec, ctx: StudentContext) -> Any:
    """``students.build_student``, typed loosely so tests can read ``.config`` and friends."""
    return students.build_student(spec, ctx)


def forward_with_features(
    student: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs plus the output of ``student.hint_layer``, the way training hooks it."""
    captured: list[torch.Tensor] = []
    layer = student.get_submodule(str(student.hint_layer))
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = student(**batch)
    finally:
        handle.remove()
    return out, captured[-1]


def make_ctx(**overrides: Any) -> StudentContext:
    values: dict[str, Any] = {
        "task": "classification",
        "modality": "tabular",
        "input_shape": (64,),
        "input_names": ["inputs"],
        "output_dim": 10,
        "teacher_parameters": DIGITS_TEACHER_PARAMETERS,
        "teacher_bytes": DIGITS_TEACHER_PARAMETERS * 4,
    }
    values.update(overrides)
    return StudentContext(**values)


def image_ctx(size: int, channels: int = 1, **overrides: Any) -> StudentContext:
    return make_ctx(modality="image", input_shape=(channels, size, size), **overrides)


def sequence_ctx(**overrides: Any) -> StudentContext:
    return make_ctx(modality="sequence", input_shape=(12, 5), **overrides)


def text_ctx(**overrides: Any) -> StudentContext:
    values: dict[str, Any] = {
        "modality": "text",
        "input_shape": (16,),
        "input_names": ["input_ids", "attention_mask", "token_type_ids"],
        "vocab_size": 500,
        "teacher_parameters": 400_000,
    }
    values.update(overrides)
    return make_ctx(**values)


def text_batch(n: int = 4, length: int = 16, vocab: int = 500) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 5:] = 0  # a padded row
    ids[0, 5:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros(n, length, dtype=torch.long),
    }


def batch_for(ctx: StudentContext, n: int = 4) -> dict[str, torch.Tensor]:
    if ctx.modality == "text":
        return text_batch(n, ctx.input_shape[0], ctx.vocab_size or 2)
    return {"inputs": torch.randn(n, *ctx.input_shape)}


CASES = [
    ("mlp", StudentSpec(architecture="mlp"), make_ctx()),
    ("cnn-8x8", StudentSpec(architecture="cnn"), image_ctx(8)),
    ("cnn-32x32", StudentSpec(architecture="cnn"), image_ctx(32, channels=3)),
    ("rnn-gru", StudentSpec(architecture="rnn", cell="gru"), sequence_ctx()),
    ("rnn-lstm", StudentSpec(architecture="rnn", cell="lstm", num_layers=2), sequence_ctx()),
    ("rnn-text", StudentSpec(architecture="rnn"), text_ctx()),
    ("transformer-text", StudentSpec(architecture="transformer"), text_ctx()),
    ("transformer-seq", StudentSpec(architecture="transformer"), sequence_ctx()),
]


@pytest.mark.parametrize(("name", "spec", "ctx"), CASES, ids=[c[0] for c in CASES])
def test_each_architecture_builds_runs_and_rebuilds(
    name: str, spec: StudentSpec, ctx: StudentContext
) -> None:
    torch.manual_seed(0)
    student = build_student(spec, ctx).eval()
    batch = batch_for(ctx)
    out = student(**batch)
    assert out.shape == (4, ctx.output_dim)
    assert out.dtype == torch.float32

    config = json.loads(json.dumps(student.config))  # JSON-able, and what export writes
    assert config["architecture"] == spec.architecture
    assert config["output_dim"] == ctx.output_dim
    assert config["parameters"] == count_parameters(student)
    assert config["budget_met"] is True
    assert config["parameters"] <= config["parameter_budget"]

    rebuilt: Any = rebuild_student(config).eval()
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    assert rebuilt.config == student.config
    torch.testing.assert_close(rebuilt(**batch), out)

    out2, features = forward_with_features(student, batch)
    assert features.shape == (4, student.feature_dim)
    torch.testing.assert_close(out2, out)


def test_auto_picks_architecture_from_modality() -> None:
    spec = StudentSpec()
    assert build_student(spec, make_ctx()).config["architecture"] == "mlp"
    assert build_student(spec, image_ctx(8)).config["architecture"] == "cnn"
    assert build_student(spec, sequence_ctx()).config["architecture"] == "rnn"
    assert build_student(spec, text_ctx()).config["architecture"] == "transformer"


def test_auto_hits_compression_on_digits_teacher() -> None:
    student = build_student(StudentSpec(compression=10), make_ctx())
    budget = DIGITS_TEACHER_PARAMETERS // 10
    params = count_parameters(student)
    assert params <= budget
    assert params >= 0.9 * budget  # as large as allowed, not merely under it
    assert DIGITS_TEACHER_PARAMETERS / params >= 10


@pytest.mark.parametrize("ctx", [make_ctx(), image_ctx(8), sequence_ctx(), text_ctx()])
def test_max_parameters_wins_over_compression(ctx: StudentContext) -> None:
    student = build_student(StudentSpec(compression=2, max_parameters=40_000), ctx)
    assert count_parameters(student) <= 40_000
    assert student.config["parameter_budget"] == 40_000
    assert student.config["budget_met"] is True


def test_tree_ensemble_byte_budget() -> None:
    # A forest has no weight tensors: its byte size over compression, at 4 bytes a parameter.
    ctx = make_ctx(teacher_parameters=0, teacher_bytes=2_000_000)
    student = build_student(StudentSpec(compression=20), ctx)
    budget = 2_000_000 // 20 // 4
    assert student.config["parameter_budget"] == budget
    assert 0.9 * budget <= count_parameters(student) <= budget


def test_budget_below_floor_returns_floor_and_says_so() -> None:
    student = build_student(StudentSpec(max_parameters=50), make_ctx())
    assert student.config["budget_met"] is False
    assert student.config["hidden_sizes"] == [8, 8]
    student(inputs=torch.randn(2, 64))


def test_explicit_architecture_without_knobs_is_sized_by_budget() -> None:
    small = build_student(StudentSpec(architecture="rnn", max_parameters=5_000), sequence_ctx())
    large = build_student(StudentSpec(architecture="rnn", max_parameters=50_000), sequence_ctx())
    assert count_parameters(small) <= 5_000 < count_parameters(large) <= 50_000


def test_explicit_knobs_are_used_as_given() -> None:
    student = build_student(
        StudentSpec(architecture="mlp", hidden_sizes=[32, 16, 8], dropout=0.1), make_ctx()
    )
    assert student.config["hidden_sizes"] == [32, 16, 8]
    assert student.feature_dim == 8
    cnn = build_student(StudentSpec(architecture="cnn", channels=[4, 8]), image_ctx(8))
    assert cnn.config["channels"] == [4, 8]
    tr = build_student(
        StudentSpec(architecture="transformer", hidden_size=24, num_layers=1, num_heads=3),
        text_ctx(),
    )
    assert (tr.config["hidden_size"], tr.config["num_layers"], tr.config["num_heads"]) == (24, 1, 3)


def test_no_budget_uses_designed_default() -> None:
    student = build_student(StudentSpec(compression=None), make_ctx())
    assert student.config["parameter_budget"] is None
    assert student.config["hidden_sizes"] == [256, 256]


def test_mlp_flattens_any_per_sample_shape() -> None:
    ctx = make_ctx(input_shape=(3, 4, 5))
    student = build_student(StudentSpec(architecture="mlp"), ctx)
    assert student(inputs=torch.randn(2, 3, 4, 5)).shape == (2, 10)


def test_embedding_student_ends_in_projection_to_teacher_width() -> None:
    ctx = text_ctx(task="embedding", output_dim=384)
    student = build_student(StudentSpec(max_parameters=60_000), ctx)
    assert isinstance(student.head, nn.Linear)
    assert student.head.out_features == 384
    assert student.feature_dim < 384  # narrower student, projected up to the teacher
    assert student(**text_batch()).shape == (4, 384)


def test_text_students_ignore_padding() -> None:
    """Padding a row further must not change its output (mask-aware pooling)."""
    for arch in ("rnn", "transformer"):
        torch.manual_seed(0)
        student = build_student(StudentSpec(architecture=arch), text_ctx()).eval()
        ids = torch.randint(1, 500, (1, 6))
        short = student(input_ids=ids, attention_mask=torch.ones(1, 6, dtype=torch.long))
        padded_ids = torch.cat([ids, torch.zeros(1, 10, dtype=torch.long)], dim=1)
        mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 10)], dim=1).long()
        padded = student(input_ids=padded_ids, attention_mask=mask)
        torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-5)


def test_text_student_inputs_exclude_token_type_ids() -> None:
    student = build_student(StudentSpec(), text_ctx())
    assert student.config["input_names"] == ["input_ids", "attention_mask"]


def test_wrong_modality_is_refused() -> None:
    with pytest.raises(SpecInvalid) as err:
        build_student(StudentSpec(architecture="cnn"), make_ctx())
    assert err.value.field == "student.architecture"
    with pytest.raises(SpecInvalid):
        build_student(StudentSpec(architecture="mlp"), text_ctx())
    with pytest.raises(SpecInvalid):
        build_student(StudentSpec(architecture="rnn"), text_ctx(vocab_size=None))


def test_rebuild_unknown_architecture_is_refused() -> None:
    with pytest.raises(SpecInvalid):
        rebuild_student({"architecture": "nope", "input_names": ["inputs"], "output_dim": 1})


def test_rebuild_dispatches_through_registry() -> None:
    calls: list[dict[str, Any]] = []

    @STUDENTS.register("hf_test_double")
    def build_double(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
        assert ctx.saved_config is not None
        calls.append(ctx.saved_config)
        return nn.Linear(2, 2)

    config = {"architecture": "hf_test_double", "input_names": ["inputs"], "output_dim": 2}
    try:
        assert isinstance(rebuild_student(config), nn.Linear)
    finally:
        STUDENTS._items.pop("hf_test_double")
    assert calls == [config]


def test_auto_uses_hf_encoder_for_transformers_teachers(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeTeacher:
        class signature:  # mimics TeacherRuntime.signature
            format = "huggingface"

    built: list[StudentContext] = []

    def fake_hf(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
        built.append(ctx)
        return nn.Identity()

    # setitem restores the registry afterwards, whether or not worker.engine.hf is loaded.
    monkeypatch.setitem(STUDENTS._items, "hf_encoder", fake_hf)
    student = build_student(StudentSpec(), text_ctx(teacher=FakeTeacher()))
    assert isinstance(student, nn.Identity)
    assert built[0].teacher is not None
