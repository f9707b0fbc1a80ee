"""A small student, a soft loss and a seeded training set for the training tests."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.engine.spec import TrainingSpec
from worker.engine.training import TrainingData, TrainResult, train


class Student(nn.Module):
    """A small student with dropout, so resuming must restore the RNG too."""

    hint_layer = "body"
    feature_dim = 32

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(32, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(inputs))


class SoftLoss(nn.Module):
    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        return {"soft": nn.functional.mse_loss(student_out.float(), teacher_out.float())}


def make_data(n: int = 200, seed: int = 0) -> TrainingData:
    """160 training and 40 validation rows of a linear teacher with 4 outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    t = x @ w
    return TrainingData(
        train={"inputs": x[:160]},
        train_teacher=t[:160],
        train_labels=None,
        val={"inputs": x[160:]},
        val_teacher=t[160:],
    )


def spec(**kw: Any) -> TrainingSpec:
    """Six epochs of five steps (batch 32), no time-based checkpoints."""
    base = {"epochs": 6, "batch_size": 32, "learning_rate": 1e-2, "checkpoint_every_minutes": None}
    return TrainingSpec(**{**base, **kw})


def run(data: TrainingData, training: TrainingSpec, **kw: Any) -> TrainResult:
    """Train a fresh, seeded :class:`Student` on CPU."""
    torch.manual_seed(training.seed)
    return train(
        student=Student(),
        loss_fn=SoftLoss(),
        data=data,
        spec=training,
        task="regression",
        teacher_output_kind="values",
        device=torch.device("cpu"),
        **kw,
    )


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}
