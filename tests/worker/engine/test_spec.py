"""The job spec: defaults, field-naming errors, and the pieces the API relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine.errors import SpecInvalid
from worker.engine.spec import (
    DistillationSpec,
    JobSpec,
    LocalJobSpec,
    MethodSpec,
    load_local_spec,
    parse_spec,
)

MINIMAL = {"teacher": {"path": "t.onnx"}, "dataset": {"path": "d.npz"}}


def test_defaults_fill_everything_but_teacher_and_dataset() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.student.architecture == "auto"
    assert spec.student.compression == 10
    assert spec.method.temperature == "auto" and spec.method.alpha == 0.9
    assert spec.method.mixup == "auto"
    assert spec.training.epochs == "auto" and spec.training.optimizer == "adamw"
    assert spec.evaluation.validation_split == 0.1 and spec.evaluation.baseline is None
    assert spec.export.formats == ["onnx", "safetensors"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"training": {"epochs": 0}}, "training.epochs"),
        ({"training": {"optimizer": "lion"}}, "training.optimizer"),
        ({"student": {"architecture": "resnet"}}, "student.architecture"),
        ({"student": {"compression": 0.5}}, "student.compression"),
        ({"method": {"temperature": -1}}, "method.temperature"),
        ({"method": {"temperature": "hot"}}, "method.temperature"),
        ({"method": {"mixup": -1}}, "method.mixup"),
        ({"method": {"mixup": 65}}, "method.mixup"),
        ({"method": {"alpha": 1.5}}, "method.alpha"),
        ({"evaluation": {"validation_split": 0.95}}, "evaluation.validation_split"),
        ({"export": {"formats": []}}, "export.formats"),
        ({"export": {"formats": ["onnx", "onnx"]}}, "export.formats"),
        ({"training": {"epochz": 3}}, "training.epochz"),
        ({"tasks": "classification"}, "tasks"),
        ({"student": {"hidden_sizes": [65536]}}, "student.hidden_sizes.0"),
        ({"student": {"hidden_sizes": [8] * 65}}, "student.hidden_sizes"),
        ({"student": {"channels": [8] * 17}}, "student.channels"),
        ({"student": {"hidden_size": 16385}}, "student.hidden_size"),
    ],
)
def test_errors_name_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(SpecInvalid) as info:
        parse_spec({**MINIMAL, **patch})
    assert info.value.field == field
    assert info.value.code == "spec_invalid"
    assert field in info.value.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"training": {"grad_clip_norm": Infinity}}', "training.grad_clip_norm"),
        ('{"training": {"grad_clip_norm": NaN}}', "training.grad_clip_norm"),
        (
            '{"training": {"checkpoint_every_minutes": Infinity}}',
            "training.checkpoint_every_minutes",
        ),
        ('{"student": {"dropout": NaN}}', "student.dropout"),
        (
            '{"method": {"extra_terms": [{"name": "hint", "weight": NaN}]}}',
            "method.extra_terms.0.weight",
        ),
    ],
)
def test_non_finite_numbers_are_refused(body: str, field: str) -> None:
    # Python's json (as the API reads bodies) accepts these literals; JSON would store null.
    patch = json.loads(body)
    with pytest.raises(SpecInvalid) as info:
        parse_spec({**MINIMAL, **patch})
    assert info.value.field == field
    assert "finite" in info.value.message


def test_method_must_fit_task() -> None:
    with pytest.raises(SpecInvalid, match="kd needs task classification"):
        parse_spec({**MINIMAL, "task": "regression", "method": {"name": "kd"}})


def test_method_defaults_follow_the_task() -> None:
    spec = DistillationSpec()
    assert spec.method_for("classification") == "kd"
    assert spec.method_for("regression") == "mse"
    assert spec.method_for("embedding") == "cosine"
    assert DistillationSpec(method=MethodSpec(name="mae")).method_for("regression") == "mae"


def test_job_spec_needs_ids_and_checks_webhook() -> None:
    with pytest.raises(SpecInvalid) as info:
        parse_spec({}, JobSpec)
    assert info.value.field in ("teacher_model_id", "dataset_id")
    with pytest.raises(SpecInvalid) as info:
        parse_spec({"teacher_model_id": "m", "dataset_id": "d", "webhook_url": "ftp://x"}, JobSpec)
    assert info.value.field == "webhook_url"
    ok = parse_spec({"teacher_model_id": "m", "dataset_id": "d"}, JobSpec)
    assert ok.teacher_model_id == "m"


def test_local_spec_paths_are_relative_to_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(MINIMAL))
    spec = load_local_spec(path)
    assert isinstance(spec, LocalJobSpec)
    assert spec.teacher.path == str(tmp_path / "t.onnx")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecInvalid, match="cannot read spec"):
        load_local_spec(bad)


def test_spec_round_trips_through_json() -> None:
    spec = parse_spec({**MINIMAL, "method": {"extra_terms": [{"name": "hint", "weight": 0.5}]}})
    again = parse_spec(json.loads(spec.model_dump_json()))
    assert again == spec


def test_spec_module_imports_no_torch() -> None:
    code = (
        "import sys; import worker.engine.spec, worker.engine.errors, worker.engine.signature, "
        "worker.engine.archive, worker.engine.registry; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
