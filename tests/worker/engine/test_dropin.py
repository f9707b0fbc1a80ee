"""The student as a drop-in for real, fully trained teachers, scored on held-out rows.

Every student here is the exported ``student.onnx`` run in onnxruntime on the very
feed dict the teacher takes, on rows neither the teacher nor the engine saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from tests.worker.engine.factories import (
    digit_cnn,
    digits,
    export_onnx,
    one_torch_thread,
    sklearn_forest_onnx,
    train_mlp_teacher,
    write_npz,
)
from worker.engine.data import load_transfer_set
from worker.engine.data.splitting import split_three
from worker.engine.export import load_student
from worker.engine.pipeline import run
from worker.engine.spec import DistillationSpec
from worker.engine.students import CNNStudent

#: Minutes of real teachers and students: handed out first (see tests/conftest.py).
pytestmark = pytest.mark.slow


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _signature(session: ort.InferenceSession) -> tuple[list[Any], list[Any]]:
    inputs = [(v.name, v.type) for v in session.get_inputs()]
    outputs = [(v.name, v.type) for v in session.get_outputs()]
    return inputs, outputs


def _r2(truth: np.ndarray, predicted: np.ndarray) -> float:
    truth, predicted = truth.ravel().astype(np.float64), predicted.ravel().astype(np.float64)
    return float(1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())


# --------------------------------------------------------------------------- regression


@pytest.fixture(scope="module")
def diabetes_teacher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A GradientBoostingRegressor on diabetes (features of scale 0.1, targets in the hundreds)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor

    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    model = GradientBoostingRegressor(random_state=0).fit(x_train, y_train)
    folder = tmp_path_factory.mktemp("diabetes")
    path = folder / "teacher.onnx"
    path.write_bytes(
        to_onnx(model, x_train[:1], target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString()
    )
    return {"path": path, "x": x_train, "x_test": x_test, "y_test": y_test}


def _plain_mlp_on_raw_targets(
    x: np.ndarray, targets: np.ndarray, hidden: list[int], epochs: int, batch: int, lr: float
) -> nn.Module:
    """The student's architecture trained the plain way: raw inputs, MSE on raw targets."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = x.shape[1]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(targets.astype(np.float32).reshape(-1, 1))
    for _ in range(epochs):
        for rows in torch.randperm(len(xt)).split(batch):
            loss = nn.functional.mse_loss(model(xt[rows]), yt[rows])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model.eval()


def test_regressor_student_through_the_cli_is_a_drop_in_within_005_r2(
    tmp_path: Path, diabetes_teacher: dict[str, Any]
) -> None:
    teacher_path = diabetes_teacher["path"]
    write_npz(tmp_path / "transfer.npz", diabetes_teacher["x"])
    epochs = 60
    (tmp_path / "spec.json").write_text(
        json.dumps(
            {
                "teacher": {"path": str(teacher_path)},
                "dataset": {"path": "transfer.npz"},
                "training": {"epochs": epochs},
            }
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "worker.engine", "run", "spec.json", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher, student = _session(teacher_path), _session(out / "student.onnx")
    assert _signature(student) == _signature(teacher)
    # The teacher's feed dict, unchanged, feeds the student.
    feed = {teacher.get_inputs()[0].name: diabetes_teacher["x_test"]}
    y_test = diabetes_teacher["y_test"]
    teacher_r2 = _r2(y_test, teacher.run(None, feed)[0])
    student_r2 = _r2(y_test, student.run(None, feed)[0])

    config = json.loads((out / "student_config.json").read_text())
    train_targets = teacher.run(None, {teacher.get_inputs()[0].name: diabetes_teacher["x"]})[0]
    plain = _plain_mlp_on_raw_targets(
        diabetes_teacher["x"], train_targets, config["hidden_sizes"], epochs, 128, 1e-3
    )
    with torch.no_grad():
        plain_r2 = _r2(y_test, plain(torch.from_numpy(diabetes_teacher["x_test"])).numpy())
    print(f"R2 teacher {teacher_r2:.3f} student {student_r2:.3f} plain {plain_r2:.3f}")
    assert student_r2 >= teacher_r2 - 0.05, (student_r2, teacher_r2)
    assert plain_r2 < student_r2 - 0.2, (plain_r2, student_r2)

    # student_config.json and the weights rebuild the same student, preprocessing included.
    rebuilt = load_student(out / "student.safetensors", out / "student_config.json")
    with torch.no_grad():
        rebuilt_out = rebuilt(inputs=torch.from_numpy(diabetes_teacher["x_test"])).numpy()
    np.testing.assert_allclose(rebuilt_out, student.run(None, feed)[0], rtol=1e-4, atol=1e-3)
    parity = json.loads((out / "metrics.json").read_text())["parity"]
    assert parity["names_matched"] and parity["dtypes_matched"]


# --------------------------------------------------------------------------- classification


def _plain_mlp_on_probabilities(
    x: np.ndarray, probabilities: np.ndarray, hidden: list[int], epochs: int, batch: int
) -> nn.Module:
    """The student's architecture trained the plain way: standardised inputs, cross-entropy
    to the teacher's probabilities, every training row, the last step kept."""
    torch.manual_seed(0)
    mean, scale = x.mean(0), x.std(0) + 1e-12
    layers: list[nn.Module] = []
    width = x.shape[1]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    body = nn.Sequential(*layers, nn.Linear(width, probabilities.shape[1]))
    return _fit_on_probabilities(body, x, probabilities, mean, scale, epochs, batch)


def _fit_on_probabilities(
    body: nn.Module,
    x: np.ndarray,
    probabilities: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    epochs: int,
    batch: int,
) -> nn.Module:
    """The plain KD loop: AdamW, cross-entropy of ``body`` on standardised ``x`` to the
    teacher's ``probabilities``, the last step kept; wrapped to take raw inputs."""
    optimizer = torch.optim.AdamW(body.parameters(), lr=1e-3)
    xt = torch.from_numpy(((x - mean) / scale).astype(np.float32))
    pt = torch.from_numpy(probabilities.astype(np.float32))
    for _ in range(epochs):
        for rows in torch.randperm(len(xt)).split(batch):
            log_probs = nn.functional.log_softmax(body(xt[rows]), dim=-1)
            loss = -(pt[rows] * log_probs).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    body.eval()

    class Standardised(nn.Module):
        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            return body((rows - torch.from_numpy(mean)) / torch.from_numpy(scale))

    return Standardised().eval()


@pytest.mark.parametrize("zipmap, string_labels", [(True, False), (False, True)])
def test_forest_student_matches_the_teachers_signature_labels_and_accuracy(
    tmp_path: Path, zipmap: bool, string_labels: bool
) -> None:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    labels = np.array(["benign", "malignant"])[y] if string_labels else y.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, labels, test_size=0.3, random_state=0)
    teacher_path, forest = sklearn_forest_onnx(
        x_train, y_train, tmp_path / "forest.onnx", zipmap=zipmap
    )
    data = write_npz(tmp_path / "transfer.npz", x_train)
    # The product's defaults: epochs "auto", the test split held out of training.
    spec = DistillationSpec.model_validate({"training": {"checkpoint_every_minutes": None}})
    result = run(spec, teacher_path=teacher_path, dataset_path=data, out_dir=tmp_path / "out")

    teacher, student = _session(teacher_path), _session(tmp_path / "out" / "student.onnx")
    assert _signature(student) == _signature(teacher)
    feed = {teacher.get_inputs()[0].name: x_test}
    teacher_label, student_label = teacher.run(None, feed)[0], student.run(None, feed)[0]
    assert student_label.dtype == teacher_label.dtype
    assert set(student_label.tolist()) <= set(forest.classes_.tolist())
    # Classes 0..K-1 are the ArgMax itself; other labels are looked up in the graph.
    ops = [node.op_type for node in onnx.load(tmp_path / "out" / "student.onnx").graph.node]
    assert ("Gather" in ops) == string_labels, ops
    teacher_accuracy = float(np.mean(teacher_label == y_test))
    student_accuracy = float(np.mean(student_label == y_test))
    config = json.loads((tmp_path / "out" / "student_config.json").read_text())
    plain = _plain_mlp_on_probabilities(
        x_train, forest.predict_proba(x_train), config["hidden_sizes"], 60, 64
    )
    with torch.no_grad():
        plain_class = plain(torch.from_numpy(x_test)).argmax(1).numpy()
    plain_accuracy = float(np.mean(forest.classes_[plain_class] == y_test))
    print(
        f"accuracy teacher {teacher_accuracy:.3f} student {student_accuracy:.3f} "
        f"plain {plain_accuracy:.3f} (best step {result.metrics['training']['best_step']} "
        f"of {result.steps})"
    )
    assert student_accuracy >= teacher_accuracy - 0.01, (student_accuracy, teacher_accuracy)
    # The defaults mix 4 rows a training row for the teacher to label; only training mixes.
    split = result.metrics["split"]
    assert split["mixed_rows"] == 4 * split["train_rows"]
    assert split["train_rows"] + split["validation_rows"] + split["test_rows"] == len(x_train)
    # The engine keeps what a plain loop on the same architecture and targets gets.
    assert student_accuracy >= plain_accuracy - 0.02, (student_accuracy, plain_accuracy)
    probabilities = student.run(None, feed)[1]
    if zipmap:
        assert set(probabilities[0]) == set(forest.classes_.tolist())
    else:
        np.testing.assert_allclose(np.asarray(probabilities).sum(1), 1.0, atol=1e-5)
    parity = result.metrics["parity"]
    assert parity["names_matched"] and parity["dtypes_matched"]
    assert parity["outputs"][0]["agreement"] >= 0.9
    # No labels: the student's accuracy is its agreement, judged once, by min_agreement.
    criteria = result.metrics["verdict"]["criteria"]
    assert result.metrics["split"]["reference"] == "teacher"
    assert criteria["min_metric_ratio"]["met"] is None
    assert criteria["min_agreement"]["value"] == result.metrics["student"]["accuracy"]


# --------------------------------------------------------------------------- torch teacher


def test_torch_teacher_names_and_float64_dtype_are_kept_and_logits_stay_logits(
    tmp_path: Path,
) -> None:
    x, y = digits()
    x_train, x_test, y_train, _ = train_test_split(x, y, test_size=0.3, random_state=0)
    module = train_mlp_teacher(x_train, y_train, hidden=(128,), epochs=20).double()
    teacher_path = export_onnx(
        module,
        (torch.from_numpy(x_train[:2].astype(np.float64)),),
        tmp_path / "teacher.onnx",
        input_names=["pixels"],
        output_names=["class_scores"],
    )
    data = write_npz(tmp_path / "transfer.npz", x_train)
    spec = DistillationSpec.model_validate(
        {"training": {"epochs": 8, "batch_size": 64, "checkpoint_every_minutes": None}}
    )
    result = run(spec, teacher_path=teacher_path, dataset_path=data, out_dir=tmp_path / "out")

    teacher, student = _session(teacher_path), _session(tmp_path / "out" / "student.onnx")
    assert _signature(student) == _signature(teacher)
    assert student.get_inputs()[0].type == "tensor(double)"
    feed = {"pixels": x_test.astype(np.float64)}
    teacher_scores, student_scores = teacher.run(None, feed)[0], student.run(None, feed)[0]
    # Logits where the teacher gives logits: no softmax was added.
    assert not np.allclose(student_scores.sum(1), 1.0, atol=1e-3)
    assert student_scores.dtype == teacher_scores.dtype == np.float64
    # parity ran the student on the teacher's own feed of the engine's test rows.
    parity = result.metrics["parity"]
    assert parity["names_matched"] and parity["dtypes_matched"]
    assert parity["rows"] == result.metrics["split"]["test_rows"] > 0


# --------------------------------------------------------------------------- image teacher


def _one_thread_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch1_latency_ms(
    teacher_path: Path, student_path: Path, feed: dict[str, np.ndarray], runs: int = 400
) -> tuple[float, float]:
    """Median batch-1 latency (ms) of teacher and student, one thread each, runs interleaved
    so that a busy machine slows both alike."""
    sessions = [_one_thread_session(teacher_path), _one_thread_session(student_path)]
    for session in sessions:
        for _ in range(30):
            session.run(None, feed)
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for session, taken in zip(sessions, times, strict=True):
            start = time.perf_counter()
            session.run(None, feed)
            taken.append(time.perf_counter() - start)
    teacher_ms, student_ms = (1000 * float(np.median(taken)) for taken in times)
    return teacher_ms, student_ms


def onnx_size(path: Path) -> tuple[int, int]:
    """(weights held in initializers, bytes of the graph file and its external data)."""
    import onnx

    model = onnx.load(str(path))  # loads external data from beside the graph
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    return weights, path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def plain_cnn_on_probabilities(
    images: np.ndarray, probabilities: np.ndarray, channels: list[int], epochs: int, batch: int
) -> nn.Module:
    """The student's CNN trained the plain way: images standardised per channel,
    cross-entropy to the teacher's probabilities, every transfer row, the last step kept."""
    torch.manual_seed(0)
    mean = images.mean(axis=(0, 2, 3), keepdims=True)[0]
    scale = images.std(axis=(0, 2, 3), keepdims=True)[0] + 1e-12
    body = CNNStudent(images.shape[1], channels, probabilities.shape[1])
    return _fit_on_probabilities(body, images, probabilities, mean, scale, epochs, batch)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def engine_test_rows(transfer_zip: Path, spec: DistillationSpec) -> tuple[np.ndarray, np.ndarray]:
    """The transfer set's test split as the engine reads and splits it: (images, labels)."""
    transfer_set = load_transfer_set(transfer_zip, spec.data)
    evaluation = spec.evaluation
    _, _, test = split_three(
        transfer_set, evaluation.validation_split, evaluation.test_split, spec.training.seed
    )
    assert test is not None and test.labels is not None
    return test.arrays["inputs"], test.labels


def test_image_cnn_student_through_the_cli_on_the_defaults_is_a_drop_in_within_a_point(
    tmp_path: Path,
) -> None:
    case = digit_cnn()
    teacher_path = case.teacher
    (tmp_path / "spec.json").write_text(
        json.dumps(
            {
                "teacher": {"path": str(teacher_path)},
                "dataset": {"path": str(case.transfer_zip)},
                "training": {"checkpoint_every_minutes": None},
            }
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "worker.engine", "run", "spec.json", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    student_path = out / "student.onnx"
    teacher, student = _session(teacher_path), _session(student_path)
    assert _signature(student) == _signature(teacher)
    assert teacher.get_inputs()[0].name == "image"
    x_test, y_test = case.held_out_images, case.held_out_labels
    feed = {"image": x_test}
    teacher_accuracy = float(np.mean(teacher.run(None, feed)[0].argmax(1) == y_test))
    student_accuracy = float(np.mean(student.run(None, feed)[0].argmax(1) == y_test))

    config = json.loads((out / "student_config.json").read_text())
    assert config["architecture"] == "cnn" and config["input_names"] == ["inputs"]
    train_logits = teacher.run(None, {"image": case.train_images})[0]
    with one_torch_thread():
        plain = plain_cnn_on_probabilities(
            case.train_images, softmax(train_logits), config["channels"], 60, 64
        )
    with torch.no_grad():
        plain_class = plain(torch.from_numpy(x_test)).argmax(1).numpy()
    plain_accuracy = float(np.mean(plain_class == y_test))

    one = {"image": x_test[:1]}
    teacher_ms, student_ms = batch1_latency_ms(teacher_path, student_path, one)
    teacher_weights, teacher_bytes = onnx_size(teacher_path)
    student_weights, student_bytes = onnx_size(student_path)
    metrics = json.loads((out / "metrics.json").read_text())
    print(
        f"held-out accuracy ({len(y_test)} images): teacher {teacher_accuracy:.4f} "
        f"student {student_accuracy:.4f} plain {plain_accuracy:.4f}; batch-1 latency "
        f"teacher {teacher_ms:.4f} ms student {student_ms:.4f} ms; weights {teacher_weights} "
        f"vs {student_weights}, bytes {teacher_bytes} vs {student_bytes}; channels "
        f"{config['channels']}; steps {metrics['training']['steps']} in "
        f"{metrics['training']['seconds']:.1f} s; ladder {metrics['ladder']['planned']} "
        f"chosen {metrics['ladder']['chosen']}"
    )
    assert teacher_accuracy >= 0.97, teacher_accuracy
    assert student_accuracy >= teacher_accuracy - 0.01, (student_accuracy, teacher_accuracy)
    # The engine keeps what a plain loop on the same architecture and targets gets.
    assert student_accuracy >= plain_accuracy - 0.02, (student_accuracy, plain_accuracy)
    assert student_ms < teacher_ms, (student_ms, teacher_ms)
    assert student_weights < teacher_weights and student_bytes < teacher_bytes

    # metrics.json says what the files do on the engine's own test rows.
    spec = DistillationSpec.model_validate({"training": {"checkpoint_every_minutes": None}})
    rows, labels = engine_test_rows(case.transfer_zip, spec)
    assert metrics["split"]["test_rows"] == len(labels)
    for side, session in (("teacher", teacher), ("student", student)):
        scored = float(np.mean(session.run(None, {"image": rows})[0].argmax(1) == labels))
        assert metrics[side]["accuracy"] == pytest.approx(scored, abs=1e-9), side
    assert metrics["verdict"]["deployable"] is True, metrics["verdict"]
    assert metrics["speedup"] > 1.0 and metrics["compression"] > 1.0
    assert metrics["student"]["parameters"] < metrics["teacher"]["parameters"]
    # auto sized the CNN by a ladder of widths, judged on the validation rows.
    ladder = metrics["ladder"]
    assert ladder["knob"] == "channels" and ladder["basis"] == "validation"
    assert config["channels"] == ladder["rungs"][ladder["chosen"]]["channels"]
    assert [r["channels"] for r in ladder["rungs"]] == ladder["planned"][: len(ladder["rungs"])]
    parity = metrics["parity"]
    assert parity["names_matched"] and parity["dtypes_matched"]
