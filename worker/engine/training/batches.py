"""What the loop trains on: the whole training set as tensors, and the batches drawn from it.

Keeping the training set as tensors (on the device when it fits) and drawing
batches by index needs no data loader and makes a seeded run deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.training.devices import Batch


@dataclass
class TrainingData:
    """What one training run reads: inputs, teacher targets and labels, train and validation."""

    train: Batch
    train_teacher: torch.Tensor | None
    train_labels: torch.Tensor | None
    val: Batch
    val_teacher: torch.Tensor
    train_features: torch.Tensor | None = None
    #: For online mode: the teacher is run on every batch instead of reading ``train_teacher``.
    online_teacher: Any = None
    hint_layer: str | None = None

    @property
    def size(self) -> int:
        """The number of training rows."""
        return len(next(iter(self.train.values())))

    def lengths(self) -> torch.Tensor | None:
        """Each training row's tokens (its attention mask's sum) for text, else None."""
        mask = self.train.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        return mask.ne(0).sum(dim=1).cpu()


#: Batches whose rows are drawn together and then sorted by length (see :func:`length_bucketed`).
BATCHES_PER_BUCKET = 32


def length_bucketed(
    order: torch.Tensor, lengths: torch.Tensor, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """``order`` rearranged so that each batch holds rows of similar length, batches shuffled.

    Text rows are padded to ``data.max_length`` and each batch is cut to its longest
    row (:func:`~worker.engine.hf.wrapper.trim_padding`), so one long sentence makes
    a whole batch pay for its length. The shuffled ``order`` is cut into buckets of
    :data:`BATCHES_PER_BUCKET` batches; each bucket is sorted by length and cut into
    batches, and the batches (the last, short one of the epoch kept last) are
    shuffled. Every row is still visited once an epoch, each batch is still a random
    draw within its bucket, and the same generator gives the same epoch.
    """
    bucket = batch_size * BATCHES_PER_BUCKET
    pieces = []
    for start in range(0, len(order), bucket):
        rows = order[start : start + bucket]
        pieces.append(rows[torch.argsort(lengths[rows], stable=True)])
    sorted_order = torch.cat(pieces) if pieces else order
    full = len(sorted_order) // batch_size
    if full < 2:
        return sorted_order
    batches = sorted_order[: full * batch_size].view(full, batch_size)
    shuffled = batches[torch.randperm(full, generator=generator)].reshape(-1)
    return torch.cat([shuffled, sorted_order[full * batch_size :]])


@dataclass
class TrainingBatch:
    """One step's rows on the training device: inputs, labels and the teacher's targets."""

    inputs: Batch
    labels: torch.Tensor | None
    teacher_outputs: torch.Tensor | None
    teacher_features: torch.Tensor | None


def draw_batch(
    data: TrainingData, rows: torch.Tensor, device: torch.device, use_teacher: bool
) -> TrainingBatch:
    """The batch of ``rows``; teacher targets are read from the cache or, online, computed."""
    inputs = {
        name: value[rows.to(value.device)].to(device, non_blocking=True)
        for name, value in data.train.items()
    }
    labels = None
    if data.train_labels is not None:
        labels = data.train_labels[rows.to(data.train_labels.device)].to(device, non_blocking=True)
    teacher_outputs: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None
    if use_teacher and data.online_teacher is not None:
        with torch.no_grad():
            if data.hint_layer is not None:
                teacher_outputs, teacher_features = data.online_teacher.predict_with_features(
                    inputs, data.hint_layer
                )
            else:
                teacher_outputs = data.online_teacher.predict(inputs)
    elif use_teacher:
        assert data.train_teacher is not None
        teacher_outputs = data.train_teacher[rows.to(data.train_teacher.device)].to(device)
        if data.train_features is not None:
            features = data.train_features
            teacher_features = features[rows.to(features.device)].to(device)
    return TrainingBatch(inputs, labels, teacher_outputs, teacher_features)


def keep_on_device_if_small(
    data: TrainingData, device: torch.device, limit: int = 2 * 2**30
) -> None:
    """Keep the whole training set on the device when it fits comfortably; no loader needed."""
    if device.type == "cpu":
        return
    tensors = [*data.train.values(), *data.val.values()]
    size = sum(t.numel() * t.element_size() for t in tensors)
    if size > limit:
        return
    data.train = {name: value.to(device) for name, value in data.train.items()}
    data.val = {name: value.to(device) for name, value in data.val.items()}
    for name in ("train_teacher", "train_labels", "train_features", "val_teacher"):
        value = getattr(data, name)
        if value is not None:
            setattr(data, name, value.to(device))
