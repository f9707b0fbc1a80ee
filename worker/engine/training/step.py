"""One optimisation step: the student's forward pass, the loss, and the update."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.engine.training.batches import TrainingBatch
from worker.engine.training.devices import Batch, autocast


def take_step(
    student: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrainingBatch,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    params: list[nn.Parameter],
    clip_norm: float | None,
) -> dict[str, torch.Tensor]:
    """Forward, loss, backward and update on ``batch``; returns the detached loss terms."""
    student_features: torch.Tensor | None = None
    with autocast(device, amp_dtype):
        if batch.teacher_features is not None:
            student_outputs, student_features = forward_with_features(student, batch.inputs)
        else:
            student_outputs = student(**batch.inputs)
    terms = loss_fn(
        student_outputs,
        batch.teacher_outputs,
        labels=batch.labels,
        student_features=student_features,
        teacher_features=batch.teacher_features,
    )
    total_loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    total_loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return {name: value.detach() for name, value in terms.items()}


def forward_with_features(student: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's outputs and its penultimate features (``student.hint_layer``), flattened."""
    captured: list[torch.Tensor] = []
    layer = student.get_submodule(student.hint_layer)  # type: ignore[arg-type]
    handle = layer.register_forward_hook(
        lambda _module, _inputs, output: captured.append(_first_tensor(output))
    )
    try:
        outputs = student(**batch)
    finally:
        handle.remove()
    return outputs, captured[-1].flatten(1)


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return _first_tensor(output[0])
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state.mean(1)
    raise TypeError(f"cannot take features from {type(output).__name__}")
