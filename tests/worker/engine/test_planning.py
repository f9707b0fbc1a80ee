"""The run plan and its pre-flight warnings (no torch), and the plan as a run carries it out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from worker.engine import planning
from worker.engine.pipeline import RunResult, run
from worker.engine.planning import plan_run, preflight_warnings
from worker.engine.spec import DistillationSpec, TrainingSpec
from worker.engine.training import Callbacks


def test_auto_is_the_default_and_a_number_of_epochs_is_still_accepted() -> None:
    assert TrainingSpec().epochs == "auto"
    assert TrainingSpec(epochs=7).epochs == 7


@pytest.mark.parametrize("epochs", [0, "many", 2.5, 10001])
def test_a_bad_epochs_value_is_one_error_naming_the_field(epochs: Any) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        TrainingSpec(epochs=epochs)
    assert [e["loc"] for e in caught.value.errors()] == [("epochs",)]
    assert '"auto"' in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize("rate", [0, -1e-3, 11, "fast", None])
def test_a_learning_rate_is_auto_or_a_number_in_range(rate: Any) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        TrainingSpec(learning_rate=rate)
    assert [e["loc"] for e in caught.value.errors()] == [("learning_rate",)]
    assert caught.value.errors()[0]["msg"].endswith(
        'must be "auto" or a number above 0 and at most 10'
    )


def test_an_auto_learning_rate_is_smaller_for_a_bridged_student() -> None:
    assert TrainingSpec().learning_rate == "auto"
    fresh = plan_run(TrainingSpec(), rows=6400, student_parameters=5_000_000, text=True)
    bridged = plan_run(
        TrainingSpec(), rows=6400, student_parameters=5_000_000, text=True, bridged=True
    )
    assert fresh.learning_rate == planning.LEARNING_RATE == 1e-3
    assert bridged.learning_rate == planning.BRIDGED_LEARNING_RATE == 3e-4
    assert bridged.to_dict()["learning_rate"] == 3e-4
    # A number is kept, bridged or not.
    given = TrainingSpec(learning_rate=5e-3)
    assert plan_run(given, rows=64, student_parameters=100, bridged=True).learning_rate == 5e-3


def test_auto_batches_take_fewer_rows_of_text_and_a_number_is_kept() -> None:
    assert TrainingSpec().batch_size == "auto"
    text = plan_run(TrainingSpec(), rows=6400, student_parameters=5_000_000, text=True)
    table = plan_run(TrainingSpec(), rows=6400, student_parameters=5_000_000)
    assert (text.batch_size, text.steps_per_epoch) == (planning.TEXT_BATCH_SIZE, 200) == (32, 200)
    assert (table.batch_size, table.steps_per_epoch) == (planning.BATCH_SIZE, 50) == (128, 50)
    given = TrainingSpec(batch_size=64)
    assert plan_run(given, rows=6400, student_parameters=5_000, text=True).batch_size == 64
    # The teacher pass takes large batches whatever a step takes.
    assert planning.pass_batch_size(TrainingSpec()) == planning.PASS_BATCH_SIZE
    assert planning.pass_batch_size(TrainingSpec(batch_size=1024)) == 1024


def test_auto_takes_at_least_the_floor_of_steps_on_a_small_set() -> None:
    plan = plan_run(TrainingSpec(), rows=1260, student_parameters=8_000)
    assert plan.steps_per_epoch == 10  # 1260 rows in batches of 128
    assert plan.total_steps >= planning.MIN_STEPS_SMALL
    assert plan.epochs == plan.total_steps // plan.steps_per_epoch == 150
    assert plan.source == "auto" and "1500 optimizer steps" in plan.reason
    assert plan.early_stopping_patience is not None and plan.early_stopping_patience >= 3
    assert plan.early_stopping_from_step == planning.MIN_STEPS_SMALL
    assert plan.warnings == []


def test_a_larger_student_gets_a_higher_floor() -> None:
    small = plan_run(TrainingSpec(), rows=1000, student_parameters=10_000)
    medium = plan_run(TrainingSpec(), rows=1000, student_parameters=1_000_000)
    large = plan_run(TrainingSpec(), rows=1000, student_parameters=50_000_000)
    assert small.min_steps == planning.MIN_STEPS_SMALL
    assert planning.MIN_STEPS_SMALL < medium.min_steps < planning.MIN_STEPS_LARGE
    assert large.min_steps == planning.MIN_STEPS_LARGE


def test_auto_makes_a_few_passes_over_a_large_set() -> None:
    plan = plan_run(TrainingSpec(), rows=128_000, student_parameters=8_000)
    assert (plan.steps_per_epoch, plan.epochs) == (1000, planning.MIN_EPOCHS)
    assert "passes over the training rows" in plan.reason


def test_auto_is_capped_by_max_steps_and_by_the_time_budget() -> None:
    capped = plan_run(TrainingSpec(max_steps=400), rows=1260, student_parameters=8_000)
    assert capped.total_steps == 400 and "max_steps 400" in capped.reason
    assert [w.field for w in capped.warnings] == ["training.max_steps"]

    # A 20M-parameter student on 512-token rows cannot do 3000 steps in a minute on a CPU.
    short = plan_run(
        TrainingSpec(max_minutes=1), rows=5000, student_parameters=20_000_000, positions=512
    )
    assert short.total_steps < short.min_steps
    assert "to fit training.max_minutes 1" in short.reason
    assert [w.code for w in short.warnings] == ["time_budget_short"]


def test_a_measured_step_replaces_the_estimate_where_the_budget_decides() -> None:
    short = TrainingSpec(max_minutes=1)

    def sized(step_seconds: float | None = None) -> planning.RunPlan:
        return plan_run(
            short,
            rows=5000,
            student_parameters=20_000_000,
            positions=512,
            step_seconds=step_seconds,
        )

    estimated = sized()
    assert estimated.speed == "estimated" and estimated.cut_by_budget
    assert planning.budget_binds(short, estimated)
    measured = sized(step_seconds=0.01)
    assert measured.speed == "measured" and measured.seconds_per_step == 0.01
    assert measured.total_steps == measured.min_steps > estimated.total_steps
    assert not measured.cut_by_budget and measured.warnings == []
    # Where max_steps ends the run well within the budget, the speed decides nothing.
    capped = TrainingSpec(max_steps=10)
    assert not planning.budget_binds(capped, plan_run(capped, rows=1260, student_parameters=8_000))


def test_an_explicit_short_run_and_a_short_budget_are_warned_about() -> None:
    few = plan_run(TrainingSpec(epochs=20), rows=1260, student_parameters=8_000)
    assert few.total_steps == 200 and few.early_stopping_patience is None
    assert [(w.code, w.field) for w in few.warnings] == [("too_few_steps", "training.epochs")]

    enough = plan_run(TrainingSpec(epochs=100), rows=1260, student_parameters=8_000)
    assert enough.warnings == []

    slow = plan_run(
        TrainingSpec(epochs=50, max_minutes=1),
        rows=5000,
        student_parameters=20_000_000,
        positions=512,
    )
    codes = [(w.code, w.field) for w in slow.warnings]
    assert ("time_budget_short", "training.max_minutes") in codes


def test_a_small_text_transfer_set_is_warned_about_and_a_small_table_is_not() -> None:
    few = plan_run(TrainingSpec(), rows=1500, student_parameters=5_000_000, text=True)
    assert [(w.code, w.field) for w in few.warnings] == [("small_transfer_set", "dataset_id")]
    assert "1500 training sentences" in few.warnings[0].message
    enough = plan_run(
        TrainingSpec(), rows=planning.SMALL_TEXT_TRANSFER, student_parameters=5_000_000, text=True
    )
    assert enough.warnings == []
    assert plan_run(TrainingSpec(), rows=1500, student_parameters=5_000).warnings == []

    # Before the job runs: the rows left for training after the validation and test splits.
    def codes(rows: int) -> list[str]:
        warned = preflight_warnings(
            DistillationSpec(),
            rows=rows,
            modality="text",
            feature_shape=[64],
            teacher_parameters=22_700_000,
            teacher_bytes=None,
        )
        return [w.code for w in warned]

    assert "small_transfer_set" in codes(planning.SMALL_TEXT_TRANSFER + 100)
    assert "small_transfer_set" not in codes(2 * planning.SMALL_TEXT_TRANSFER)


def test_preflight_estimates_the_student_from_the_teacher() -> None:
    spec = DistillationSpec(training=TrainingSpec(epochs=5))
    warned = preflight_warnings(
        spec,
        rows=1400,
        modality="tabular",
        feature_shape=[64],
        teacher_parameters=85_000,
        teacher_bytes=340_000,
    )
    assert [w.code for w in warned] == ["too_few_steps"]
    assert (
        preflight_warnings(
            DistillationSpec(),
            rows=1400,
            modality="tabular",
            feature_shape=[64],
            teacher_parameters=85_000,
            teacher_bytes=340_000,
        )
        == []
    )


def test_planning_imports_no_torch() -> None:
    # A fresh interpreter: this module itself imports the engine's torch side.
    code = "import sys, worker.engine.planning; print('torch' in sys.modules)"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert found == "False"


# ------------------------------------------------------------------ the plan in a run


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fully trained digits teacher (ONNX), its transfer set, and held-out rows."""
    import torch

    from tests.worker.engine.factories import digits, export_onnx, train_mlp_teacher, write_npz

    folder = tmp_path_factory.mktemp("digits_job")
    x, y = digits()
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    teacher = train_mlp_teacher(x[train], y[train])
    return {
        "teacher": export_onnx(teacher, (torch.from_numpy(x[:2]),), folder / "teacher.onnx"),
        "dataset": write_npz(folder / "digits.npz", x[train], y[train]),
        "x_test": x[test],
        "y_test": y[test],
    }


def held_out_accuracy(model: Path, job: dict[str, Any]) -> float:
    """Accuracy of the ONNX file ``model`` on the held-out rows, in onnxruntime."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = session.run(None, {name: job["x_test"]})[0]
    return float((outputs.argmax(1) == job["y_test"]).mean())


def distil(
    training: dict[str, Any], job: dict[str, Any], out: Path, method: dict[str, Any] | None = None
) -> tuple[RunResult, list[tuple[str, dict[str, Any]]]]:
    """An MLP student of the digits teacher, trained as ``training`` (and ``method``) say; the
    result and the events and progress rows in the order the run sent them."""
    log: list[tuple[str, dict[str, Any]]] = []
    spec = DistillationSpec.model_validate(
        {"student": {"architecture": "mlp"}, "training": training, "method": method or {}}
    )
    result = run(
        spec,
        teacher_path=job["teacher"],
        dataset_path=job["dataset"],
        out_dir=out,
        callbacks=Callbacks(
            on_event=lambda kind, data: log.append((kind, data)),
            on_progress=lambda row: log.append(("progress", row)),
        ),
    )
    return result, log


@pytest.mark.slow
# Two full runs and a teacher: about a minute on a free machine, far more on a shared one.
@pytest.mark.timeout(1800)
def test_the_default_run_keeps_the_teachers_accuracy_where_20_epochs_did_not(
    tmp_path: Path, digits_job: dict[str, Any]
) -> None:
    teacher = held_out_accuracy(digits_job["teacher"], digits_job)
    default, log = distil({}, digits_job, tmp_path / "default")
    # The old default: 20 epochs of the transfer set's own rows (no mixed rows to lengthen them).
    old, _ = distil({"epochs": 20}, digits_job, tmp_path / "old", {"mixup": 0})
    student = held_out_accuracy(tmp_path / "default" / "student.onnx", digits_job)
    old_student = held_out_accuracy(tmp_path / "old" / "student.onnx", digits_job)
    print(f"teacher {teacher:.4f} default {student:.4f} 20 epochs {old_student:.4f}")

    assert teacher > 0.97
    assert student >= teacher - 0.01, (student, teacher)
    assert old_student < student - 0.05, (old_student, student)
    plan = default.metrics["training"]["plan"]
    assert plan["source"] == "auto" and plan["total_steps"] >= planning.MIN_STEPS_SMALL
    assert default.steps >= planning.MIN_STEPS_SMALL
    old_plan = old.metrics["training"]["plan"]
    assert old_plan["source"] == "spec"
    assert old_plan["total_steps"] == 20 * old_plan["steps_per_epoch"] < planning.MIN_STEPS_SMALL
    assert not [data for kind, data in log if kind == "warning"]


def test_a_short_explicit_run_is_warned_about_before_training(
    tmp_path: Path, digits_job: dict[str, Any]
) -> None:
    result, log = distil({"epochs": 2}, digits_job, tmp_path / "out")
    warnings = [data for kind, data in log if kind == "warning"]
    assert warnings == result.metrics["training"]["plan"]["warnings"]
    assert [(w["code"], w["field"]) for w in warnings] == [("too_few_steps", "training.epochs")]
    kinds = [kind for kind, _ in log]
    assert kinds.index("warning") < kinds.index("progress")
    plan = result.metrics["training"]["plan"]
    assert plan["epochs"] == 2 and plan["total_steps"] == 2 * plan["steps_per_epoch"]
    assert result.steps == plan["total_steps"] and result.stop_reason == "completed"
