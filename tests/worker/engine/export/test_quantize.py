"""``student.int8.onnx``: a fully trained teacher, a run that asks for int8, the file scored.

The int8 student is run in onnxruntime on the teacher's own feed dict, on rows neither
the teacher nor the engine saw, and on the engine's test split to check metrics.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tests.worker.engine.factories import digits, export_onnx, write_npz
from worker.engine.data import load_transfer_set
from worker.engine.data.splitting import split_three
from worker.engine.errors import ExportFailed
from worker.engine.evaluation import validate_metrics
from worker.engine.export import quantize
from worker.engine.export.quantize import INT8_NAME, choose_method, quantize_int8
from worker.engine.pipeline import RunResult, run
from worker.engine.spec import DistillationSpec, ExportSpec
from worker.engine.training import Callbacks


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _scores(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(session.run(None, feed)[0])


def _accuracy(session: ort.InferenceSession, feed: dict[str, np.ndarray], y: np.ndarray) -> float:
    return float((_scores(session, feed).argmax(1) == y).mean())


def _mlp_teacher(x: np.ndarray, y: np.ndarray) -> nn.Sequential:
    """A (256, 256) MLP classifier fitted with full-batch Adam to convergence on ``x``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The digits MLP teacher as ONNX, its transfer set, and rows only this file sees."""
    x, y = digits()
    order = np.random.default_rng(1).permutation(len(x))
    seen, held_out = order[:1440], order[1440:]
    folder = tmp_path_factory.mktemp("int8_teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train faster on one thread of a shared CPU
    try:
        module = _mlp_teacher(x[seen], y[seen])
    finally:
        torch.set_num_threads(threads)
    path = export_onnx(module, (torch.from_numpy(x[:2]),), folder / "teacher.onnx")
    return {
        "path": path,
        "data": write_npz(folder / "transfer.npz", x[seen], y[seen]),
        "x_test": x[held_out],
        "y_test": y[held_out],
    }


@pytest.fixture(scope="module")
def int8_run(
    teacher: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[RunResult, Path, list[tuple[str, dict[str, Any]]]]:
    """A run with the product defaults, asking for an int8 student."""
    out = tmp_path_factory.mktemp("int8_run")
    events: list[tuple[str, dict[str, Any]]] = []
    spec = DistillationSpec.model_validate({"export": {"quantize": ["int8"]}})
    result = run(
        spec,
        teacher_path=teacher["path"],
        dataset_path=teacher["data"],
        out_dir=out,
        callbacks=Callbacks(on_event=lambda kind, data: events.append((kind, data))),
    )
    return result, out, events


def test_int8_student_keeps_the_accuracy_of_the_fp32_student_in_a_smaller_file(
    teacher: dict[str, Any],
    int8_run: tuple[RunResult, Path, list[tuple[str, dict[str, Any]]]],
) -> None:
    _, out, events = int8_run
    assert not [e for kind, e in events if kind == "warning"]
    fp32, int8, reference = (
        _session(out / "student.onnx"),
        _session(out / INT8_NAME),
        _session(teacher["path"]),
    )
    # A drop-in like student.onnx: the teacher's names, and its feed dict runs all three.
    names = [(v.name, v.type) for v in reference.get_inputs()]
    assert [(v.name, v.type) for v in int8.get_inputs()] == names
    assert [v.name for v in int8.get_outputs()] == [v.name for v in reference.get_outputs()]
    feed = {reference.get_inputs()[0].name: teacher["x_test"]}
    y = teacher["y_test"]
    teacher_acc = _accuracy(reference, feed, y)
    fp32_acc, int8_acc = _accuracy(fp32, feed, y), _accuracy(int8, feed, y)
    assert teacher_acc > 0.95
    assert fp32_acc > 0.9
    assert abs(int8_acc - fp32_acc) <= 0.02
    # The int8 student gives what the fp32 one gives on nearly every held-out row.
    agreement = (_scores(int8, feed).argmax(1) == _scores(fp32, feed).argmax(1)).mean()
    assert agreement >= 0.97

    fp32_bytes = (out / "student.onnx").stat().st_size
    int8_bytes = (out / INT8_NAME).stat().st_size
    assert not (out / (INT8_NAME + ".data")).exists()
    assert int8_bytes * 2.5 <= fp32_bytes
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(out / INT8_NAME).graph.node)


def test_int8_figures_in_metrics_json_are_the_files_on_the_engines_test_split(
    teacher: dict[str, Any],
    int8_run: tuple[RunResult, Path, list[tuple[str, dict[str, Any]]]],
) -> None:
    result, out, _ = int8_run
    metrics = json.loads((out / "metrics.json").read_text())
    validate_metrics(metrics)
    entry = metrics["quantized"]["int8"]
    student = metrics["student"]
    # The engine's own test split, re-drawn as the engine drew it, scored here.
    spec = DistillationSpec()
    _, _, test = split_three(
        load_transfer_set(teacher["data"], spec.data),
        spec.evaluation.validation_split,
        spec.evaluation.test_split,
        spec.training.seed,
    )
    assert test is not None and test.labels is not None
    assert len(test) == metrics["split"]["test_rows"]
    feed = {"input": test.arrays["inputs"]}
    int8_scores = _scores(_session(out / INT8_NAME), feed)
    teacher_scores = _scores(_session(teacher["path"]), feed)
    int8_acc = float((int8_scores.argmax(1) == test.labels).mean())
    assert entry["accuracy"] == pytest.approx(int8_acc, abs=1e-9)
    assert entry["fidelity"]["agreement"] == pytest.approx(
        float((int8_scores.argmax(1) == teacher_scores.argmax(1)).mean()), abs=1e-9
    )
    assert entry["metric_delta_vs_fp32"] == pytest.approx(int8_acc - student["accuracy"])
    int8_bytes = (out / INT8_NAME).stat().st_size
    assert entry["file_bytes"] == int8_bytes
    assert entry["file_bytes_vs_fp32"] == pytest.approx(student["file_bytes"] / int8_bytes)
    assert entry["compression_by_file_bytes"] == pytest.approx(
        metrics["teacher"]["file_bytes"] / int8_bytes
    )
    assert entry["method"] == "dynamic"
    assert entry["onnxruntime_latency_ms"] > 0 and entry["onnxruntime_throughput"] > 0
    assert student["onnxruntime_latency_ms"] > 0
    assert entry["speedup_vs_fp32"] == pytest.approx(
        student["onnxruntime_latency_ms"] / entry["onnxruntime_latency_ms"]
    )
    # Listed and hashed like every artifact, and described on the card.
    artifacts = {a.name: a for a in result.artifacts}
    assert artifacts[INT8_NAME].sha256 == hashlib.sha256((out / INT8_NAME).read_bytes()).hexdigest()
    assert artifacts[INT8_NAME].bytes == int8_bytes
    assert artifacts[INT8_NAME].media_type == "application/onnx"
    card = (out / "model_card.md").read_text()
    assert "### int8 student" in card and f"{int8_bytes:,} bytes" in card


# --------------------------------------------------------------------------- failures


def test_a_failed_quantization_is_a_warning_and_the_job_finishes(
    teacher: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # onnxruntime quantizes every student the engine builds; a quantizer that writes a
    # broken file stands for one that does not, and the check that runs the file finds it.
    def broken(source: Path, target: Path, *args: Any) -> None:
        target.write_bytes(Path(source).read_bytes()[:100])

    monkeypatch.setattr(quantize, "_quantize", broken)
    events: list[tuple[str, dict[str, Any]]] = []
    spec = DistillationSpec.model_validate(
        {
            "export": {"quantize": ["int8"]},
            "training": {"max_steps": 20, "checkpoint_every_minutes": None},
            "evaluation": {"baseline": False},
        }
    )
    result = run(
        spec,
        teacher_path=teacher["path"],
        dataset_path=teacher["data"],
        out_dir=tmp_path / "out",
        callbacks=Callbacks(on_event=lambda kind, data: events.append((kind, data))),
    )
    warnings = [
        data for kind, data in events if kind == "warning" and data["code"] == "quantization_failed"
    ]
    assert len(warnings) == 1
    assert warnings[0]["field"] == "export.quantize"
    assert "int8" in warnings[0]["message"]
    assert result.metrics["quantized"] == {"int8": None}
    assert not (tmp_path / "out" / INT8_NAME).exists()
    assert INT8_NAME not in {a.name for a in result.artifacts}
    assert "student.onnx" in {a.name for a in result.artifacts}
    assert (
        "quantization was asked for but failed" in (tmp_path / "out" / "model_card.md").read_text()
    )


def test_quantize_int8_raises_export_failed_and_leaves_no_file(
    teacher: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(source: Path, target: Path, *args: Any) -> None:
        target.write_bytes(b"not an onnx file")

    monkeypatch.setattr(quantize, "_quantize", broken)
    with pytest.raises(ExportFailed, match="int8 quantization"):
        quantize_int8(teacher["path"], {"input": teacher["x_test"]}, out=tmp_path / INT8_NAME)
    assert not (tmp_path / INT8_NAME).exists()


# --------------------------------------------------------------------------- the module alone


def test_weights_kept_beside_the_graph_are_read_and_the_int8_file_keeps_them_beside_it(
    teacher: dict[str, Any], tmp_path: Path
) -> None:
    model = onnx.load(teacher["path"])
    fp32 = tmp_path / "student.onnx"
    onnx.save_model(
        model, fp32, save_as_external_data=True, location="student.onnx.data", size_threshold=0
    )
    assert (tmp_path / "student.onnx.data").exists()
    found = quantize_int8(fp32, {"input": teacher["x_test"]})
    assert found.path == tmp_path / INT8_NAME and found.method == "dynamic"
    assert (tmp_path / (INT8_NAME + ".data")).exists()
    assert found.file_bytes == quantize.onnx_file_bytes(found.path)
    feed = {"input": teacher["x_test"]}
    y = teacher["y_test"]
    fp32_acc = _accuracy(_session(fp32), feed, y)
    assert abs(_accuracy(_session(found.path), feed, y) - fp32_acc) <= 0.02


def test_convolution_graphs_are_quantized_statically() -> None:
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph([conv], "g", [], [])
    assert choose_method(onnx.helper.make_model(graph)) == "static"
    matmul = onnx.helper.make_node("MatMul", ["x", "w"], ["y"])
    assert choose_method(onnx.helper.make_model(onnx.helper.make_graph([matmul], "g", [], []))) == (
        "dynamic"
    )


def test_the_spec_refuses_int8_without_onnx_and_repeats() -> None:
    assert ExportSpec().quantize == []
    assert ExportSpec.model_validate({"quantize": ["int8"]}).quantize == ["int8"]
    with pytest.raises(ValidationError, match="needs onnx"):
        ExportSpec.model_validate({"formats": ["safetensors"], "quantize": ["int8"]})
    with pytest.raises(ValidationError, match="repeat"):
        ExportSpec.model_validate({"quantize": ["int8", "int8"]})
    with pytest.raises(ValidationError):
        ExportSpec.model_validate({"quantize": ["int4"]})
