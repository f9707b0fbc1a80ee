"""Preprocessing the student carries inside itself, learned from the transfer set's training rows.

A :class:`PreprocessedStudent` wraps any built student: it standardises each float
input per feature (the last axis of sequences, the channel axis of images, every
column of tabular rows) and maps the inner student's standardised output back to the
teacher's scale (regression: per-output mean and standard deviation; embeddings: one
scale). The statistics live in the student's ``config["preprocessing"]`` (so the
student rebuilds from ``student_config.json`` alone) and as buffers (so they are in
the exported ONNX graph and the safetensors file). The student therefore takes the
teacher's raw inputs and gives outputs on the teacher's scale.

:class:`StandardisedTargetLoss` trains on standardised targets: it maps the student's
outputs, the teacher's outputs and regression labels into the standardised space
before the loss, so losses and gradient clipping see values of order one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

#: A spread below this (relative to the feature's magnitude) counts as a constant feature.
CONSTANT_TOLERANCE = 1e-6
#: The most rows the statistics are computed on; more change them by little.
MAX_ROWS = 100_000
PASSED_INPUTS = ("inputs", "input_ids", "attention_mask", "token_type_ids")


def _feature_axis(rank: int) -> int:
    """The axis that holds features: channels of (N, C, H, W) images, else the last one."""
    return 1 if rank == 4 else rank - 1


def _scale_of(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The standard deviation, with 1 where a feature is constant (no division by ~0)."""
    constant = std <= CONSTANT_TOLERANCE * np.maximum(1.0, np.abs(mean))
    return np.where(constant | ~np.isfinite(std), 1.0, std)


def input_statistics(array: np.ndarray) -> dict[str, Any] | None:
    """Per-feature mean and scale of a float input, or None for integer inputs (token ids)."""
    if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2:
        return None
    rows = array[:MAX_ROWS].astype(np.float64)
    axis = _feature_axis(rows.ndim)
    others = tuple(i for i in range(rows.ndim) if i != axis)
    mean = np.nanmean(rows, axis=others)
    scale = _scale_of(np.nanstd(rows, axis=others), mean)
    return {
        "rank": rows.ndim,
        "axis": axis,
        "mean": [float(np.float32(v)) for v in np.nan_to_num(mean)],
        "scale": [float(np.float32(v)) for v in scale],
    }


def output_statistics(task: str, teacher_outputs: np.ndarray) -> dict[str, Any] | None:
    """Output mean and scale: per output for regression, one scale for embeddings, else None."""
    values = teacher_outputs[:MAX_ROWS].reshape(min(len(teacher_outputs), MAX_ROWS), -1)
    values = values.astype(np.float64)
    width = values.shape[1]
    if task == "regression":
        mean = values.mean(axis=0)
        scale = _scale_of(values.std(axis=0), mean)
    elif task == "embedding":
        rms = float(np.sqrt(np.mean(values**2)))
        mean = np.zeros(width)
        scale = _scale_of(np.full(width, rms), mean)
    else:
        return None
    return {
        "mean": [float(np.float32(v)) for v in mean],
        "scale": [float(np.float32(v)) for v in scale],
    }


def fit_preprocessing(
    task: str, train_arrays: Mapping[str, np.ndarray], teacher_outputs: np.ndarray
) -> dict[str, Any] | None:
    """The preprocessing a student needs, from training rows and the teacher's outputs on them.

    None when there is nothing to do (integer inputs and class outputs).
    """
    inputs = {
        name: stats
        for name, array in train_arrays.items()
        if (stats := input_statistics(array)) is not None
    }
    outputs = output_statistics(task, teacher_outputs)
    if not inputs and outputs is None:
        return None
    return {"inputs": inputs, "outputs": outputs}


def _broadcast_shape(rank: int, axis: int, width: int) -> list[int]:
    shape = [1] * rank
    shape[axis] = width
    return shape


class PreprocessedStudent(nn.Module):
    """``student`` behind per-feature input standardisation and an output de-standardisation.

    Forwards ``student``'s ``config`` (with ``preprocessing`` added), ``feature_dim`` and
    ``hint_layer`` (prefixed), so training, hint losses and export see one student.
    """

    output_mean: Tensor
    output_scale: Tensor

    def __init__(self, student: nn.Module, preprocessing: Mapping[str, Any]) -> None:
        super().__init__()
        self.student = student
        self.preprocessing = dict(preprocessing)
        config = dict(getattr(student, "config", {}) or {})
        config["preprocessing"] = self.preprocessing
        self.config = config
        self.feature_dim = getattr(student, "feature_dim", None)
        self.hint_layer = "student." + str(getattr(student, "hint_layer", "body"))
        self._standardised: list[str] = []
        for name, stats in (self.preprocessing.get("inputs") or {}).items():
            shape = _broadcast_shape(int(stats["rank"]), int(stats["axis"]), len(stats["mean"]))
            self.register_buffer(f"{name}_mean", torch.tensor(stats["mean"]).reshape(shape))
            self.register_buffer(f"{name}_scale", torch.tensor(stats["scale"]).reshape(shape))
            self._standardised.append(name)
        outputs = self.preprocessing.get("outputs")
        self.has_output_scale = outputs is not None
        if outputs is not None:
            self.register_buffer("output_mean", torch.tensor(outputs["mean"]))
            self.register_buffer("output_scale", torch.tensor(outputs["scale"]))

    def standardise_outputs(self, values: Tensor) -> Tensor:
        """Values on the teacher's scale mapped to the inner student's (standardised) scale."""
        if not self.has_output_scale:
            return values
        return (values.float() - self.output_mean) / self.output_scale

    def forward(
        self,
        inputs: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        given = {
            "inputs": inputs,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        }
        batch = {name: value for name, value in given.items() if value is not None}
        for name in self._standardised:
            if name in batch:
                mean = getattr(self, f"{name}_mean")
                scale = getattr(self, f"{name}_scale")
                batch[name] = (batch[name].to(mean.dtype) - mean) / scale
        out = self.student(**batch)
        if not self.has_output_scale:
            return out
        return out.float() * self.output_scale + self.output_mean


def wrap_student(student: nn.Module, preprocessing: Mapping[str, Any] | None) -> nn.Module:
    """``student`` in a :class:`PreprocessedStudent`; as it is when there is nothing to do."""
    if not preprocessing:
        return student
    unknown = [name for name in preprocessing.get("inputs") or {} if name not in PASSED_INPUTS]
    if unknown:
        # A student reading other input names keeps raw inputs rather than losing them.
        preprocessing = {**preprocessing, "inputs": {}}
        if preprocessing.get("outputs") is None:
            return student
    return PreprocessedStudent(student, preprocessing)


class StandardisedTargetLoss(nn.Module):
    """``loss`` computed in the student's standardised output space.

    The student's outputs, the teacher's outputs and regression labels (NaN rows stay
    NaN) are all standardised with the student's output statistics first.
    """

    mean: Tensor
    scale: Tensor

    def __init__(self, loss: nn.Module, student: PreprocessedStudent) -> None:
        super().__init__()
        self.loss = loss
        self.needs_features = bool(getattr(loss, "needs_features", False))
        self.register_buffer("mean", student.output_mean.detach().clone())
        self.register_buffer("scale", student.output_scale.detach().clone())

    def _standardised(self, values: Tensor) -> Tensor:
        return (values.float().reshape(values.shape[0], -1) - self.mean) / self.scale

    def forward(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None = None,
        labels: Tensor | None = None,
        **features: Any,
    ) -> dict[str, Tensor]:
        if labels is not None and labels.is_floating_point():
            labels = self._standardised(labels)
        return self.loss(
            self._standardised(student_out),
            None if teacher_out is None else self._standardised(teacher_out),
            labels=labels,
            **features,
        )


def standardised_loss(loss: nn.Module, student: nn.Module) -> nn.Module:
    """``loss`` on standardised targets when ``student`` de-standardises its outputs."""
    if isinstance(student, PreprocessedStudent) and student.has_output_scale:
        return StandardisedTargetLoss(loss, student)
    return loss
