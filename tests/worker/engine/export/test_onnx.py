"""ONNX export: dynamic batch and sequence axes, the onnxruntime match guard, the
TorchScript fallback and external data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from worker.engine.errors import ExportFailed
from worker.engine.export import export_onnx, onnx_export_info
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


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _dims(value_info: Any) -> list[Any]:
    dimensions = value_info.type.tensor_type.shape.dim
    return [dimension.dim_param or dimension.dim_value for dimension in dimensions]


def _assert_matches(
    session: onnxruntime.InferenceSession, model: nn.Module, batch: dict[str, torch.Tensor]
) -> None:
    got = session.run(["outputs"], {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        ref = model(**batch).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_mlp_onnx_has_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    path = export_onnx(model, {"inputs": torch.randn(2, 8)}, tmp_path / "student.onnx")
    graph = onnx.load(str(path)).graph
    assert [graph_input.name for graph_input in graph.input] == ["inputs"]
    assert [output.name for output in graph.output] == ["outputs"]
    assert isinstance(_dims(graph.input[0])[0], str)
    assert isinstance(_dims(graph.output[0])[0], str)
    assert onnx_export_info(path)["distillery.exporter"] == "dynamo"
    assert not (tmp_path / "student.onnx.data").exists()
    session = _session(path)
    for rows in (1, 3, 64):
        _assert_matches(session, model, {"inputs": torch.randn(rows, 8)})
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
    assert [graph_input.name for graph_input in graph.input] == ["input_ids", "attention_mask"]
    for value_info in graph.input:
        batch_dim, sequence_dim = _dims(value_info)
        assert isinstance(batch_dim, str) and isinstance(sequence_dim, str)
    session = _session(path)
    for rows, length in ((1, 12), (5, 3), (9, 40)):
        ids = torch.randint(0, 50, (rows, length))
        mask = torch.ones(rows, length, dtype=torch.int64)
        mask[:, length // 2 + 1 :] = 0
        _assert_matches(session, model, {"input_ids": ids, "attention_mask": mask})


def test_gru_onnx_has_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GRUStudent().eval()
    path = export_onnx(model, {"inputs": torch.randn(2, 6, 5)}, tmp_path / "student.onnx")
    graph = onnx.load(str(path)).graph
    batch_dim, sequence_dim, features = _dims(graph.input[0])
    assert isinstance(batch_dim, str) and isinstance(sequence_dim, str) and features == 5
    session = _session(path)
    for rows, steps in ((1, 1), (7, 6), (3, 20)):
        _assert_matches(session, model, {"inputs": torch.randn(rows, steps, 5)})


def test_export_guard_raises_when_onnx_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This tests the guard itself: onnxruntime's outputs are perturbed on purpose, so
    # both exporters' files "disagree" with torch and the export must fail loudly.
    real_run = onnx_export._run_onnx

    def perturbed(session: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
        return real_run(session, feed) + 1e-2

    monkeypatch.setattr(onnx_export, "_run_onnx", perturbed)
    path = tmp_path / "student.onnx"
    with pytest.raises(ExportFailed) as raised:
        export_onnx(MLP(), {"inputs": torch.randn(2, 8)}, path)
    message = raised.value.message
    assert "dynamo export does not match" in message
    assert "torchscript export does not match" in message
    assert "max |onnx - torch| = 0.01" in message
    assert raised.value.code == "export_failed"
    assert not path.exists()


def test_falls_back_to_torchscript_exporter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    model = MLP().eval()
    path = export_onnx(model, {"inputs": torch.randn(1, 8)}, tmp_path / "student.onnx")
    metadata = onnx_export_info(path)
    assert metadata["distillery.exporter"] == "torchscript"
    assert "dynamo cannot trace this" in metadata["distillery.fallback_reason"]
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
        for initializer in onnx.load(str(path), load_external_data=False).graph.initializer
        for entry in initializer.external_data
        if entry.key == "location"
    }
    assert locations == {"student.onnx.data"}
    _assert_matches(_session(path), model, {"inputs": torch.randn(3, 256)})
