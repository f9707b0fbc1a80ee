"""How long a run is and how fast it learns: the step plan, the optimizer and its schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

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
    def for_run(cls, spec: TrainingSpec, rows: int, log_every_steps: int | None) -> StepPlan:
        """The plan for ``rows`` training rows under ``spec``."""
        batch_size = min(spec.batch_size, rows)
        # A last batch of one row is folded into the one before (a batch of one
        # breaks batch norm); any other remainder is a short last batch.
        if rows % batch_size == 1:
            steps_per_epoch = max(1, rows // batch_size)
        else:
            steps_per_epoch = math.ceil(rows / batch_size)
        epoch_steps = spec.epochs * steps_per_epoch
        total_steps = epoch_steps if spec.max_steps is None else min(epoch_steps, spec.max_steps)
        return cls(
            batch_size=batch_size,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            log_every=log_every_steps or max(1, min(50, steps_per_epoch)),
            capped=total_steps != epoch_steps,
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


def make_optimizer(params: list[nn.Parameter], spec: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW or SGD; on CUDA the fused kernels (one launch per step instead of one per tensor)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.learning_rate,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            nesterov=spec.momentum > 0,
            fused=fused or None,
        )
    return torch.optim.AdamW(
        params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=fused or None
    )
