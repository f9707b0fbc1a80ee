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
    assert agree["val/agreement"] == 1.0 and agree["score"] == pytest.approx(0.0, abs=1e-6)
    assert validation_score(teacher, teacher, "embedding")["val/cosine"] == pytest.approx(1.0)
    far = validation_score(teacher + 1, teacher, "regression")
    assert far == {"val/output_mse": 1.0, "score": -1.0}


def test_classifiers_are_scored_on_the_divergence_where_agreement_cannot_tell() -> None:
    # Both students agree with the teacher on every row; the one nearer its probabilities
    # scores higher, whether the teacher gives logits or the probabilities themselves.
    teacher_logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.5, 0.0], [-1.0, 0.0, 0.5]])
    near, far = teacher_logits * 1.1, teacher_logits * 4.0
    teacher_probs = teacher_logits.softmax(-1)
    for teacher, kind in ((teacher_logits, "logits"), (teacher_probs, "probabilities")):
        close = validation_score(near, teacher, "classification", kind)
        loose = validation_score(far, teacher, "classification", kind)
        assert close["val/agreement"] == loose["val/agreement"] == 1.0
        assert close["score"] > loose["score"], kind
        assert close["val/kl_divergence"] == pytest.approx(-close["score"])
    # One-hot labels (the labels-only baseline's targets) read as probabilities stay finite.
    one_hot = nn.functional.one_hot(teacher_logits.argmax(-1), 3).float()
    labels = validation_score(near, one_hot, "classification", "probabilities")
    assert torch.isfinite(torch.tensor(labels["score"]))
