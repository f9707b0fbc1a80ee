"""One optimisation step: the student's forward pass, the loss, and the update."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from worker.engine.training.batches import (
    TrainingBatch,
    TrainingData,
    draw_batch,
    length_bucketed,
)
from worker.engine.training.devices import Batch, autocast

#: Steps :func:`time_steps` times, after one untimed step (allocation, lazy setup).
TIMED_STEPS = 2
#: What an optimizer update costs per parameter beyond the timed forward and backward
#: passes, in seconds: AdamW reads and writes a few values per parameter.
UPDATE_SECONDS_PER_PARAMETER = 2e-9


def loss_terms(
    student: nn.Module,
    loss_fn: nn.Module,
    batch: TrainingBatch,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """The student's forward pass on ``batch`` (with its features where the teacher's are
    matched) and the loss terms against the batch's targets."""
    features: torch.Tensor | None = None
    with autocast(device, amp_dtype):
        if batch.teacher_features is not None:
            outputs, features = forward_with_features(student, batch.inputs)
        else:
            outputs = student(**batch.inputs)
    terms: dict[str, Any] = loss_fn(
        outputs,
        batch.teacher_outputs,
        labels=batch.labels,
        student_features=features,
        teacher_features=batch.teacher_features,
    )
    return terms


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
    terms = loss_terms(student, loss_fn, batch, device, amp_dtype)
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


def time_steps(
    student: nn.Module,
    loss_fn: nn.Module,
    data: TrainingData,
    device: torch.device,
    *,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    clip_norm: float | None,
    seed: int,
    use_teacher: bool = True,
    steps: int = TIMED_STEPS,
) -> float:
    """Seconds one training step of ``student`` takes on ``data``, timed on a few batches.

    Forward, loss, backward and gradient clipping on random batches of ``batch_size``
    rows (drawn with a generator of its own, and by length for text, as training draws
    them), plus an estimate of the update: no weight changes, gradients are dropped,
    and buffers (batch-norm statistics), training modes and torch's random state are
    left as they were. Moves ``student`` and ``loss_fn`` to ``device``, where training
    puts them next.
    """
    modules = [student.to(device), loss_fn.to(device)]
    modes = [module.training for module in modules]
    buffers = [
        {name: value.detach().clone() for name, value in module.named_buffers()}
        for module in modules
    ]
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    lengths = data.lengths()
    times: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for module in modules:
            module.train()
        for _ in range(steps + 1):
            order = torch.randperm(data.size, generator=generator)
            if lengths is not None:
                # Batches as training draws them: rows of similar length.
                order = length_bucketed(order, lengths, batch_size, generator)
            rows = order[:batch_size]
            _synchronize(device)
            start = time.perf_counter()
            batch = draw_batch(data, rows, device, use_teacher)
            terms = loss_terms(student, loss_fn, batch, device, amp_dtype)
            if terms:
                torch.stack([value for value in terms.values()]).sum().backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            _synchronize(device)
            times.append(time.perf_counter() - start)
            for parameter in params:
                parameter.grad = None
    for module, mode, saved in zip(modules, modes, buffers, strict=True):
        module.train(mode)
        with torch.no_grad():
            for name, value in module.named_buffers():
                value.copy_(saved[name])
    update = UPDATE_SECONDS_PER_PARAMETER * sum(p.numel() for p in params)
    timed = times[1:] or times
    return sum(timed) / len(timed) + update


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
