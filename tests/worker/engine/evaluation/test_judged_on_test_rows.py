"""A fully trained teacher, distilled and judged on test rows, from the exported files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.worker.engine.factories import digits, export_onnx, train_mlp_teacher, write_npz
from worker.engine.data.splitting import split_three
from worker.engine.data.transfer_set import TransferSet
from worker.engine.evaluation import validate_metrics
from worker.engine.pipeline import run
from worker.engine.spec import LocalJobSpec


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An MLP teacher trained on digits to >95%, exported with torch.onnx, and its data."""
    folder = tmp_path_factory.mktemp("digits")
    x, y = digits()
    teacher = train_mlp_teacher(x, y, hidden=(128,), epochs=30)
    accuracy = float((teacher(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert accuracy > 0.95
    path = export_onnx(teacher, (torch.from_numpy(x[:2]),), folder / "teacher.onnx")
    return {"teacher": path, "data": write_npz(folder / "digits.npz", x, y), "x": x, "y": y}


def _spec(data: dict[str, Any], **evaluation: Any) -> LocalJobSpec:
    return LocalJobSpec.model_validate(
        {
            "teacher": {"path": str(data["teacher"])},
            "dataset": {"path": str(data["data"])},
            "student": {"architecture": "mlp", "hidden_sizes": [32]},
            "training": {"epochs": 15, "batch_size": 64, "learning_rate": 3e-3},
            "evaluation": evaluation,
        }
    )


def test_three_splits_are_disjoint_and_stratified() -> None:
    x, y = digits()
    rows = TransferSet({"row": np.arange(len(x))}, y, "tabular")
    train, validation, test = split_three(rows, 0.1, 0.15, seed=3)
    assert test is not None
    parts = [set(part.arrays["row"].tolist()) for part in (train, validation, test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert set().union(*parts) == set(range(len(x)))
    assert len(test) == round(len(x) * 0.15)
    # Stratified: every class keeps about its share in the test rows.
    assert test.labels is not None
    shares = np.bincount(test.labels, minlength=10) / len(test)
    np.testing.assert_allclose(shares, np.bincount(y) / len(y), atol=0.01)


def test_metrics_come_from_the_exported_files_on_test_rows(
    tmp_path: Path, digits_job: dict[str, Any]
) -> None:
    result = run(
        _spec(digits_job),
        teacher_path=digits_job["teacher"],
        dataset_path=digits_job["data"],
        out_dir=tmp_path,
        device="cpu",
        provenance={"job_id": "job_test"},
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    validate_metrics(metrics)
    split = metrics["split"]
    assert split["test_source"] == "split"
    assert split["train_rows"] + split["validation_rows"] + split["test_rows"] == len(
        digits_job["y"]
    )
    assert metrics["runtime"]["teacher"] == metrics["runtime"]["student"] == "onnxruntime"
    assert metrics["runtime"]["speed"] == "onnxruntime"

    # The same test rows the engine chose, recomputed here from student.onnx.
    everything = TransferSet({"inputs": digits_job["x"]}, digits_job["y"], "tabular")
    _, _, test = split_three(everything, 0.1, 0.15, seed=0)
    assert test is not None and len(test) == split["test_rows"]
    session = ort.InferenceSession(str(tmp_path / "student.onnx"))
    feed = {session.get_inputs()[0].name: test.arrays["inputs"]}
    accuracy = float((session.run(None, feed)[0].argmax(1) == test.labels).mean())
    assert metrics["student"]["accuracy"] == pytest.approx(accuracy)
    assert metrics["student"]["file_bytes"] == (tmp_path / "student.onnx").stat().st_size
    assert metrics["compression_by_file_bytes"] == pytest.approx(
        metrics["teacher"]["file_bytes"] / metrics["student"]["file_bytes"]
    )
    for side in ("teacher", "student"):
        assert metrics[side]["onnxruntime_latency_ms"] == metrics[side]["latency_ms"]
        assert metrics[side]["torch_latency_ms"] > 0
        interval = metrics["intervals"][side]
        assert interval["low"] <= metrics[side]["accuracy"] <= interval["high"]
    # The labels-only baseline ran by default (the set has labels).
    assert metrics["baseline"] is not None and metrics["distillation_helped"] is not None
    assert isinstance(metrics["verdict"]["deployable"], bool) and metrics["verdict"]["reasons"]
    assert result.deployable == metrics["verdict"]["deployable"]
    assert metrics["provenance"]["job_id"] == "job_test"
    card = (tmp_path / "model_card.md").read_text()
    assert card.split("\n## ")[1].startswith("Verdict")
    assert "job_test" in card


def test_a_student_that_misses_its_criteria_is_not_deployable(
    tmp_path: Path, digits_job: dict[str, Any]
) -> None:
    spec = _spec(
        digits_job, baseline=False, accept={"min_agreement": 0.999, "min_metric_ratio": 1.05}
    )
    spec.training.epochs = 1
    spec.student.hidden_sizes = [2]
    result = run(
        spec,
        teacher_path=digits_job["teacher"],
        dataset_path=digits_job["data"],
        out_dir=tmp_path,
        device="cpu",
    )
    verdict = result.metrics["verdict"]
    assert verdict["deployable"] is False and result.deployable is False
    assert verdict["criteria"]["min_agreement"]["met"] is False
    missed = [reason for reason in verdict["reasons"] if reason.startswith("missed")]
    assert any("[min_agreement]" in reason for reason in missed)
    assert any("[min_metric_ratio]" in reason for reason in missed)
    assert result.metrics["baseline"] is None


def test_a_given_test_set_is_what_the_figures_are_on(
    tmp_path: Path, digits_job: dict[str, Any]
) -> None:
    x, y = digits_job["x"], digits_job["y"]
    transfer = write_npz(tmp_path / "transfer.npz", x[:1500], y[:1500])
    test_set = write_npz(tmp_path / "test.npz", x[1500:], y[1500:])
    spec = _spec(digits_job, baseline=False)
    spec.training.epochs = 2
    result = run(
        spec,
        teacher_path=digits_job["teacher"],
        dataset_path=transfer,
        out_dir=tmp_path / "out",
        device="cpu",
        test_dataset_path=test_set,
    )
    split = result.metrics["split"]
    assert split["test_source"] == "dataset" and split["test_rows"] == len(x) - 1500
    assert split["train_rows"] + split["validation_rows"] == 1500
    assert result.metrics["provenance"]["test_dataset_sha256"] is not None
