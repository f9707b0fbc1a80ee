"""ONNX export (dynamic axes, the match guard, external data), safetensors, card and curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from worker.engine import export
from worker.engine.errors import ExportFailed
from worker.engine.export import (
    export_onnx,
    export_safetensors,
    load_student,
    onnx_export_info,
    plot_training_curves,
    write_model_card,
)
from worker.engine.export import onnx as onnx_export

# Tiny students written here so these tests do not depend on students.py's designs.


class MLP(nn.Module):
    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))
        self.config = {"architecture": "test-mlp", "input_names": ["inputs"], "features": features}

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


class MeanPoolText(nn.Module):
    """Embedding, mean over the attention mask, linear head."""

    def __init__(self, vocab: int = 50, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class GRUStudent(nn.Module):
    def __init__(self, features: int = 5, classes: int = 2) -> None:
        super().__init__()
        self.rnn = nn.GRU(features, 8, batch_first=True)
        self.head = nn.Linear(8, classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(inputs)
        return self.head(out[:, -1])


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _dims(value_info: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _assert_matches(session: ort.InferenceSession, model: nn.Module, batch: dict) -> None:
    got = session.run(["outputs"], {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        ref = model(**batch).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- ONNX


def test_mlp_onnx_has_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    path = export_onnx(model, {"inputs": torch.randn(2, 8)}, tmp_path / "student.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["inputs"]
    assert [o.name for o in graph.output] == ["outputs"]
    assert isinstance(_dims(graph.input[0])[0], str)
    assert isinstance(_dims(graph.output[0])[0], str)
    assert onnx_export_info(path)["distillery.exporter"] == "dynamo"
    assert not (tmp_path / "student.onnx.data").exists()
    session = _session(path)
    for n in (1, 3, 64):
        _assert_matches(session, model, {"inputs": torch.randn(n, 8)})
    # The student keeps its mode after export.
    assert model.training


def test_text_onnx_has_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MeanPoolText().eval()
    example = {
        "input_ids": torch.randint(0, 50, (2, 12)),
        "attention_mask": torch.tensor([[1] * 12, [1] * 7 + [0] * 5]),
    }
    path = export_onnx(model, example, tmp_path / "student.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    for value_info in graph.input:
        batch_dim, seq_dim = _dims(value_info)
        assert isinstance(batch_dim, str) and isinstance(seq_dim, str)
    session = _session(path)
    for n, length in ((1, 12), (5, 3), (9, 40)):
        ids = torch.randint(0, 50, (n, length))
        mask = torch.ones(n, length, dtype=torch.int64)
        mask[:, length // 2 + 1 :] = 0
        _assert_matches(session, model, {"input_ids": ids, "attention_mask": mask})


def test_gru_onnx_has_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GRUStudent().eval()
    path = export_onnx(model, {"inputs": torch.randn(2, 6, 5)}, tmp_path / "student.onnx")
    graph = onnx.load(str(path)).graph
    batch_dim, seq_dim, features = _dims(graph.input[0])
    assert isinstance(batch_dim, str) and isinstance(seq_dim, str) and features == 5
    session = _session(path)
    for n, steps in ((1, 1), (7, 6), (3, 20)):
        _assert_matches(session, model, {"inputs": torch.randn(n, steps, 5)})


def test_export_guard_raises_when_onnx_differs(tmp_path: Path, monkeypatch) -> None:
    # This tests the guard itself: onnxruntime's outputs are perturbed on purpose, so
    # both exporters' files "disagree" with torch and the export must fail loudly.
    real_run = onnx_export._run_onnx

    def perturbed(session: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
        return real_run(session, feed) + 1e-2

    monkeypatch.setattr(onnx_export, "_run_onnx", perturbed)
    path = tmp_path / "student.onnx"
    with pytest.raises(ExportFailed) as info:
        export_onnx(MLP(), {"inputs": torch.randn(2, 8)}, path)
    message = info.value.message
    assert "dynamo export does not match" in message
    assert "torchscript export does not match" in message
    assert "max |onnx - torch| = 0.01" in message
    assert info.value.code == "export_failed"
    assert not path.exists()


def test_falls_back_to_torchscript_exporter(tmp_path: Path, monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    model = MLP().eval()
    path = export_onnx(model, {"inputs": torch.randn(1, 8)}, tmp_path / "student.onnx")
    info = onnx_export_info(path)
    assert info["distillery.exporter"] == "torchscript"
    assert "dynamo cannot trace this" in info["distillery.fallback_reason"]
    _assert_matches(_session(path), model, {"inputs": torch.randn(5, 8)})


def test_external_data_above_threshold(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(features=256).eval()
    path = export_onnx(
        model, {"inputs": torch.randn(2, 256)}, tmp_path / "student.onnx", external_data_threshold=1
    )
    data = tmp_path / "student.onnx.data"
    assert data.exists() and data.stat().st_size >= 256 * 16 * 4
    # The graph file alone no longer holds the large weights.
    assert path.stat().st_size < data.stat().st_size
    locations = {
        entry.value
        for init in onnx.load(str(path), load_external_data=False).graph.initializer
        for entry in init.external_data
        if entry.key == "location"
    }
    assert locations == {"student.onnx.data"}
    _assert_matches(_session(path), model, {"inputs": torch.randn(3, 256)})


# --------------------------------------------------------------------------- safetensors


class Tied(nn.Module):
    """Input and output embeddings share one weight, as language models often do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.out = nn.Linear(6, 20, bias=False)
        self.out.weight = self.embed.weight
        self.config = {"architecture": "tied", "input_names": ["input_ids"]}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(input_ids).mean(1))


def test_safetensors_round_trip_with_students_rebuild(tmp_path: Path) -> None:
    from worker.engine.spec import StudentSpec
    from worker.engine.students import StudentContext, build_student

    ctx = StudentContext(
        task="classification",
        modality="tabular",
        input_shape=(8,),
        input_names=["inputs"],
        output_dim=3,
        teacher_parameters=10_000,
        teacher_bytes=40_000,
    )
    student = build_student(StudentSpec(architecture="mlp", hidden_sizes=[16]), ctx)
    weights, config = export_safetensors(
        student, tmp_path / "student.safetensors", tmp_path / "student_config.json"
    )
    saved = json.loads(config.read_text())
    assert saved["format_version"] == 1 and saved["architecture"] == "mlp"
    assert saved["weights"]["sha256"] == export.sha256_file(weights)
    assert saved["weights"]["bytes"] == weights.stat().st_size
    loaded = load_student(weights, config)
    assert not loaded.training
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs=x), student.eval()(inputs=x))
    # The rebuilt student's config is the architecture's, without the file bookkeeping.
    rebuilt: dict[str, Any] = loaded.config  # type: ignore[assignment]
    assert "weights" not in rebuilt and rebuilt["hidden_sizes"] == [16]


def test_safetensors_tied_weights_and_checksum(tmp_path: Path, monkeypatch) -> None:
    from worker.engine import students

    # A fake rebuild for an architecture students.py does not know.
    monkeypatch.setattr(students, "rebuild_student", lambda config: Tied())
    model = Tied()
    weights, config = export_safetensors(model, tmp_path / "w.safetensors", tmp_path / "c.json")
    assert json.loads(config.read_text())["tied"] == {"out.weight": "embed.weight"}
    loaded = load_student(weights, config)
    assert isinstance(loaded, Tied)
    assert loaded.out.weight.data_ptr() == loaded.embed.weight.data_ptr()
    torch.testing.assert_close(loaded.embed.weight, model.embed.weight)

    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ExportFailed, match="sha256"):
        load_student(weights, config)


# --------------------------------------------------------------------------- card, curves

METRICS = {
    "task": "classification",
    "teacher": {
        "accuracy": 0.9733,
        "top5_accuracy": 1.0,
        "f1_macro": 0.9712,
        "parameters": 85_002,
        "bytes": 340_008,
        "latency_ms": 0.412,
        "throughput": 91_234.5,
    },
    "student": {
        "accuracy": 0.9611,
        "top5_accuracy": 0.9944,
        "f1_macro": 0.9598,
        "parameters": 8_410,
        "bytes": 33_640,
        "latency_ms": 0.0871,
        "throughput": 412_345.0,
    },
    "baseline": {
        "accuracy": 0.9333,
        "top5_accuracy": 0.99,
        "f1_macro": 0.93,
        "parameters": 8_410,
        "bytes": 33_640,
        "latency_ms": 0.0871,
        "throughput": 412_345.0,
    },
    "fidelity": {
        "agreement": 0.9722,
        "kl_divergence": 0.0567,
        "output_mse": 0.0021,
        "r2_to_teacher": None,
        "cosine": None,
    },
    "compression": 10.107,
    "compression_basis": "parameters",
    "speedup": 4.73,
    "distillation_helped": True,
    "verdict": "distillation helped: the distilled student scored 0.9611 accuracy vs 0.9333 "
    "for the labels-only student",
    "split": {"validation_rows": 180, "reference": "labels"},
    "device": "cpu",
    "partial": False,
    "training": {"steps": 420, "stop_reason": "completed", "method": "kd"},
}


def test_model_card_holds_the_numbers(tmp_path: Path) -> None:
    spec = {
        "task": None,
        "method": {"name": None, "temperature": 4.0, "alpha": 0.9},
        "training": {"epochs": 20, "batch_size": 128, "learning_rate": 0.001, "optimizer": "adamw"},
    }
    signature = {
        "format": "onnx",
        "inputs": [{"name": "input", "shape": ["batch", 64], "dtype": "float32"}],
        "parameters": 85_002,
        "bytes": 340_008,
        "output_kind": "logits",
        "num_classes": 10,
        "output_dim": 10,
    }
    config = {"architecture": "mlp", "input_names": ["inputs"], "hidden_sizes": [64]}
    path = write_model_card(tmp_path / "model_card.md", METRICS, spec, signature, config)
    text = path.read_text()
    for expected in (
        "(`mlp`)",
        "`onnx` format",
        "| output width | 10 (logits) | 10 |",
        "412,345",
        "`student.onnx`: inputs `inputs`",
        "85,002",
        "8,410",
        "0.9733",
        "0.9611",
        "0.9333",
        "0.9722",
        "0.0567",
        "10.11×",
        "4.73×",
        "temperature: 4",
        "alpha (weight of the teacher's soft targets): 0.9",
        "epochs: 20",
        "method: kd",
        "distillation helped",
        "180 held-out rows",
        "transfer set only",
        "labels-only baseline",
    ):
        assert expected in text, expected


def test_training_curves_png(tmp_path: Path) -> None:
    history: list[dict[str, Any]] = []
    for step in range(10, 210, 10):
        row: dict[str, Any] = {"step": step, "epoch": step // 50, "lr": 1e-3}
        row |= {"loss": 2.0 / step**0.5, "loss/soft": 1.5 / step**0.5, "loss/hard": 0.5 / step}
        if step % 50 == 0:
            row["val/agreement"] = 1 - 1 / step
        history.append(row)
    path = plot_training_curves(tmp_path / "training_curves.png", history)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024

    empty = plot_training_curves(tmp_path / "empty.png", [])
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_without_baseline_or_onnx(tmp_path: Path) -> None:
    side = {"mae": 0.31, "mse": 0.17, "r2": 0.88, "parameters": 0, "bytes": 2_000_000}
    metrics = {
        "task": "regression",
        "teacher": {**side, "latency_ms": 3.1, "throughput": 5000.0},
        "student": {**side, "parameters": 1200, "bytes": 4800, "latency_ms": 0.1},
        "baseline": None,
        "fidelity": {"agreement": None, "output_mse": 0.0123, "r2_to_teacher": 0.97},
        "compression": 416.7,
        "compression_basis": "bytes",
        "speedup": 31.0,
        "verdict": None,
        "split": {"validation_rows": 50, "reference": "teacher"},
        "device": "cuda",
        "partial": True,
    }
    spec = {"export": {"formats": ["safetensors"]}, "method": {"name": "mse"}, "training": {}}
    signature = {"format": "onnx", "inputs": [], "output_kind": "values", "output_dim": 1}
    text = write_model_card(
        tmp_path / "card.md", metrics, spec, signature, {"architecture": "mlp"}
    ).read_text()
    assert "416.7× (by bytes)" in text and "0.0123" in text and "0.97" in text
    assert "the teacher's outputs" in text and "**partial**" in text
    assert "Did distillation help" not in text and "temperature" not in text
    assert "student.onnx" not in text and "labels-only" not in text
