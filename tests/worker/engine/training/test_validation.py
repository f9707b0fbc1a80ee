"""Validation between epochs: batched prediction and the fidelity score by task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.training import predict
from worker.engine.training.validation import validation_score


class Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * self.scale


def test_predict_runs_in_batches_in_eval_mode_and_restores_the_mode() -> None:
    module = Doubler().train()
    outputs = predict(module, {"inputs": torch.arange(10.0).reshape(10, 1)}, 3, None)
    assert outputs.shape == (10, 1) and outputs.dtype == torch.float32
    assert torch.equal(outputs[:, 0], torch.arange(10.0) * 2)
    assert module.training


def test_validation_score_is_higher_for_closer_outputs() -> None:
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    agree = validation_score(teacher, teacher, "classification")
    assert agree == {"val/agreement": 1.0, "score": 1.0}
    assert validation_score(teacher, teacher, "embedding")["val/cosine"] == pytest.approx(1.0)
    far = validation_score(teacher + 1, teacher, "regression")
    assert far == {"val/output_mse": 1.0, "score": -1.0}
