"""safetensors: the round trip through the student registry, tied weights, the checksum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from worker.engine.errors import ExportFailed
from worker.engine.export import export_safetensors, load_student
from worker.engine.export.digests import sha256_file


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

    context = StudentContext(
        task="classification",
        modality="tabular",
        input_shape=(8,),
        input_names=["inputs"],
        output_dim=3,
        teacher_parameters=10_000,
        teacher_bytes=40_000,
    )
    student = build_student(StudentSpec(architecture="mlp", hidden_sizes=[16]), context)
    weights, config = export_safetensors(
        student, tmp_path / "student.safetensors", tmp_path / "student_config.json"
    )
    saved = json.loads(config.read_text())
    assert saved["format_version"] == 1 and saved["architecture"] == "mlp"
    assert saved["weights"]["sha256"] == sha256_file(weights)
    assert saved["weights"]["bytes"] == weights.stat().st_size
    loaded = load_student(weights, config)
    assert not loaded.training
    inputs = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs=inputs), student.eval()(inputs=inputs))
    # The rebuilt student's config is the architecture's, without the file bookkeeping.
    rebuilt: dict[str, Any] = loaded.config  # type: ignore[assignment]
    assert "weights" not in rebuilt and rebuilt["hidden_sizes"] == [16]


def test_safetensors_tied_weights_and_checksum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
