"""Keras teachers, converted by tf2onnx as Keras users convert them, distilled on the
product's defaults and scored in onnxruntime on held-out rows nothing chose with.

The teachers are built by :mod:`tests.worker.engine.keras_teachers` in a process of its
own. The CNN takes channels-last images, (N, 8, 8, 1), as every Keras CNN does: the
engine holds images channels-first, and its student must still take the teacher's feed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.worker.engine.factories import one_torch_thread, run_engine_cli, write_npz
from tests.worker.engine.test_dropin import (
    _plain_mlp_on_probabilities,
    _session,
    batch1_latency_ms,
    plain_cnn_on_probabilities,
    softmax,
)

REPO = Path(__file__).resolve().parents[3]

pytestmark = [
    pytest.mark.filterwarnings("ignore"),  # the tracer notes of the student's export
    pytest.mark.slow,  # minutes of real teachers: handed out first (see tests/conftest.py)
]


@pytest.fixture(scope="module")
def keras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding ``cnn.onnx``, ``mlp.onnx`` and ``digits.npz``."""
    folder = tmp_path_factory.mktemp("keras")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.worker.engine.keras_teachers", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def _interface(session: ort.InferenceSession) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Input names, types and ranks with their fixed per-sample dims; output names."""
    inputs = [
        (value.name, value.type, *[d for d in value.shape[1:] if isinstance(d, int)])
        for value in session.get_inputs()
    ]
    return inputs, [value.name for value in session.get_outputs()]


def _assert_kept(teacher: float, student: float, plain: float) -> None:
    """Held-out accuracies: a trained teacher, the student within a point of it and within
    two of a plain loop on the same rows."""
    assert teacher >= 0.95, teacher
    assert student >= teacher - 0.01, (student, teacher)
    assert student >= plain - 0.02, (student, plain)


def _distil(work: Path, teacher: Path, rows: np.ndarray) -> Path:
    """The engine CLI on ``teacher`` and the unlabelled ``rows``, every setting the default."""
    write_npz(work / "transfer.npz", rows)
    spec = {
        "teacher": {"path": str(teacher)},
        "dataset": {"path": "transfer.npz"},
        "training": {"checkpoint_every_minutes": None},
    }
    (work / "spec.json").write_text(json.dumps(spec))
    run_engine_cli(work, timeout=600)
    return work / "out"


def test_a_keras_cnn_on_channels_last_images_gives_a_drop_in_student_within_a_point(
    tmp_path: Path, keras: Path
) -> None:
    digits = np.load(keras / "digits.npz")
    x_train = digits["x_train"].reshape(-1, 8, 8, 1)
    x_test, y_test = digits["x_test"].reshape(-1, 8, 8, 1), digits["y_test"]
    teacher_path = keras / "cnn.onnx"
    out = _distil(tmp_path, teacher_path, x_train)

    student_path = out / "student.onnx"
    teacher, student = _session(teacher_path), _session(student_path)
    # The teacher's own feed: its input name and channels-last shape, its output name.
    assert _interface(student) == _interface(teacher)
    assert teacher.get_inputs()[0].shape[1:] == [8, 8, 1]
    feed = {teacher.get_inputs()[0].name: x_test}
    teacher_accuracy = float(np.mean(teacher.run(None, feed)[0].argmax(1) == y_test))
    student_accuracy = float(np.mean(student.run(None, feed)[0].argmax(1) == y_test))
    # Inside, the student's CNN reads channels-first: one Transpose at its input.
    ops = [node.op_type for node in onnx.load(str(student_path)).graph.node]
    assert ops.count("Transpose") == 1, ops

    # A plain loop: the student's CNN on the teacher's probabilities, every transfer row.
    config = json.loads((out / "student_config.json").read_text())
    assert config["architecture"] == "cnn" and config["input_shape"] == [1, 8, 8]
    probabilities = teacher.run(None, {teacher.get_inputs()[0].name: x_train})[0]
    channels_first = np.ascontiguousarray(x_train.transpose(0, 3, 1, 2))
    with one_torch_thread():
        plain = plain_cnn_on_probabilities(
            channels_first, probabilities, config["channels"], 60, 64
        )
    with torch.no_grad():
        plain_class = plain(torch.from_numpy(x_test.transpose(0, 3, 1, 2).copy())).argmax(1)
    plain_accuracy = float(np.mean(plain_class.numpy() == y_test))
    teacher_ms, student_ms = batch1_latency_ms(teacher_path, student_path, {"image": x_test[:1]})
    metrics = json.loads((out / "metrics.json").read_text())
    print(
        f"held-out accuracy ({len(y_test)} rows): teacher {teacher_accuracy:.4f} student "
        f"{student_accuracy:.4f} plain {plain_accuracy:.4f}; batch-1 ms teacher "
        f"{teacher_ms:.4f} student {student_ms:.4f}; channels {config['channels']}"
    )
    _assert_kept(teacher_accuracy, student_accuracy, plain_accuracy)
    assert student_ms < teacher_ms, (student_ms, teacher_ms)
    # The engine ran the student on the teacher's own feed of its test rows.
    parity = metrics["parity"]
    assert parity["names_matched"] and parity["dtypes_matched"]
    assert parity["outputs"][0]["agreement"] >= 0.95
    assert metrics["verdict"]["deployable"] is True, metrics["verdict"]


def test_a_keras_mlp_with_logits_gives_a_student_within_a_point_chosen_on_the_evidence(
    tmp_path: Path, keras: Path
) -> None:
    digits = np.load(keras / "digits.npz")
    x_train, x_test, y_test = digits["x_train"], digits["x_test"], digits["y_test"]
    teacher_path = keras / "mlp.onnx"
    out = _distil(tmp_path, teacher_path, x_train)

    teacher, student = _session(teacher_path), _session(out / "student.onnx")
    assert _interface(student) == _interface(teacher)
    feed = {teacher.get_inputs()[0].name: x_test}
    teacher_scores, student_scores = teacher.run(None, feed)[0], student.run(None, feed)[0]
    # Logits where the teacher gives logits.
    assert not np.allclose(student_scores.sum(1), 1.0, atol=1e-3)
    teacher_accuracy = float(np.mean(teacher_scores.argmax(1) == y_test))
    student_accuracy = float(np.mean(student_scores.argmax(1) == y_test))
    config = json.loads((out / "student_config.json").read_text())
    logits = teacher.run(None, {teacher.get_inputs()[0].name: x_train})[0]
    plain = _plain_mlp_on_probabilities(x_train, softmax(logits), config["hidden_sizes"], 60, 64)
    with torch.no_grad():
        plain_accuracy = float(np.mean(plain(torch.from_numpy(x_test)).argmax(1).numpy() == y_test))
    metrics = json.loads((out / "metrics.json").read_text())
    rungs = metrics["ladder"]["rungs"]
    print(
        f"held-out accuracy ({len(y_test)} rows): teacher {teacher_accuracy:.4f} student "
        f"{student_accuracy:.4f} plain {plain_accuracy:.4f}; rungs "
        f"{[(r['hidden_sizes'], r['validation']['fidelity']['value']) for r in rungs]} "
        f"chosen {metrics['ladder']['chosen']}"
    )
    _assert_kept(teacher_accuracy, student_accuracy, plain_accuracy)
    # Each rung the climb passed over either missed the criteria or met them by too few
    # rows to tell: its caveat says which criterion the validation rows cannot settle.
    for rung in rungs[: metrics["ladder"]["chosen"]]:
        assert not rung["met_criteria"]
        if not any(reason.startswith("missed") for reason in rung["reasons"]):
            assert any("validation rows cannot settle" in c for c in rung["caveats"]), rung
    assert metrics["verdict"]["deployable"] is True, metrics["verdict"]
