"""How long a run is and how fast it learns: the step plan, the optimizer and its schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.planning import RunPlan
from worker.engine.spec import TrainingSpec


@dataclass(frozen=True)
class StepPlan:
    """The steps of one run over a training set of a given size."""

    batch_size: int
    steps_per_epoch: int
    total_steps: int
    #: Steps between two progress rows.
    log_every: int
    #: Whether ``training.max_steps`` ends the run before its last epoch does.
    capped: bool

    @classmethod
    def for_run(cls, plan: RunPlan, log_every_steps: int | None) -> StepPlan:
        """The steps of the run ``plan`` (see :mod:`worker.engine.planning`)."""
        return cls(
            batch_size=plan.batch_size,
            steps_per_epoch=plan.steps_per_epoch,
            total_steps=plan.total_steps,
            log_every=log_every_steps or max(1, min(50, plan.steps_per_epoch)),
            capped=plan.total_steps < plan.epochs * plan.steps_per_epoch,
        )

    def batch_rows(self, order: torch.Tensor, position: int) -> torch.Tensor:
        """The rows of the batch at ``position`` in an epoch that visits rows in ``order``."""
        start = position * self.batch_size
        if position < self.steps_per_epoch - 1:
            return order[start : start + self.batch_size]
        return order[start:]


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine, linear or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    params: list[nn.Parameter], spec: TrainingSpec, learning_rate: float
) -> torch.optim.Optimizer:
    """AdamW or SGD at ``learning_rate`` (the plan's); on CUDA the fused kernels (one launch
    per step instead of one per tensor)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=learning_rate,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            nesterov=spec.momentum > 0,
            fused=fused or None,
        )
    return torch.optim.AdamW(
        params, lr=learning_rate, weight_decay=spec.weight_decay, fused=fused or None
    )
