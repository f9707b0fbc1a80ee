"""The teacher's outputs over the transfer set, computed once and cached on disk.

An entry is keyed by the teacher, the transfer set and how it was prepared,
and stored as plain ``.npy`` (read with ``allow_pickle=False``), written to a
temporary name and renamed, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.engine.data.text import token_lengths
from worker.engine.errors import Cancelled, TimeBudgetExceeded
from worker.engine.training.callbacks import Callbacks
from worker.engine.training.devices import iter_batches

#: Bumped whenever what is cached (or how it is computed) changes.
CACHE_VERSION = "1"


def cache_key(teacher_digest: str, data_digest: str, preprocessing: dict[str, Any]) -> str:
    """The cache entry for one teacher over one transfer set with one preprocessing."""
    blob = json.dumps(
        {"v": CACHE_VERSION, "teacher": teacher_digest, "data": data_digest, "pre": preprocessing},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class TeacherPassLimits:
    """When the teacher pass must stop: a cancellation request, or its time budget spent.

    Checked between batches, and (through :meth:`TeacherRuntime.stoppable`) from
    another thread while one batch runs, so a teacher that never returns is cut off.
    """

    #: ``time.monotonic()`` past which the pass stops; None for no budget.
    deadline: float | None = None
    callbacks: Callbacks | None = None

    @classmethod
    def within(cls, minutes: float, callbacks: Callbacks | None) -> TeacherPassLimits:
        """Limits that end the pass ``minutes`` from now, or on cancellation."""
        return cls(time.monotonic() + minutes * 60.0, callbacks)

    def stop_reason(self) -> BaseException | None:
        """The error that ends the pass now, or None while it may go on."""
        try:
            if self.callbacks is not None and self.callbacks.cancelled():
                return Cancelled("cancelled while the teacher ran over the transfer set")
        except Exception as exc:  # e.g. the lease was lost: the caller's own error ends the pass
            return exc
        if self.deadline is not None and time.monotonic() > self.deadline:
            return TimeBudgetExceeded(
                "training.max_minutes ran out while the teacher ran over the transfer set",
                field="training.max_minutes",
            )
        return None

    def check(self) -> None:
        """Raise the error that ends the pass, if there is one."""
        reason = self.stop_reason()
        if reason is not None:
            raise reason


@torch.no_grad()
def compute_teacher_outputs(
    teacher: Any,
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    hint_layer: str | None = None,
    limits: TeacherPassLimits | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the teacher once over ``arrays``: (outputs, hint features or None), float32 on CPU.

    ``limits`` are checked before every batch (and during one, for runtimes that can stop).
    """
    limits = limits or TeacherPassLimits()
    order = _by_length(arrays)
    tensors = {
        name: torch.from_numpy(np.ascontiguousarray(a if order is None else a[order]))
        for name, a in arrays.items()
    }
    outputs: list[np.ndarray] = []
    features: list[np.ndarray] = []
    for _, batch in iter_batches(tensors, batch_size):
        limits.check()
        batch = {name: value.to(teacher.device) for name, value in batch.items()}
        if hint_layer is None:
            output = teacher.predict(batch)
        else:
            output, feature = teacher.predict_with_features(batch, hint_layer)
            features.append(feature.float().cpu().numpy())
        outputs.append(output.float().cpu().numpy())
    all_outputs = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    all_features = np.concatenate(features) if features else None
    if order is not None and len(all_outputs):
        # Back to the rows' own order.
        inverse = np.argsort(order, kind="stable")
        all_outputs = all_outputs[inverse]
        all_features = all_features[inverse] if all_features is not None else None
    return all_outputs, all_features


def _by_length(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Rows of tokenised text ordered by length, so a batch holds rows of like length.

    A transformers teacher runs a batch only as long as its longest row; batches of
    like length skip most padding. None for other data, which runs in its own order.
    """
    lengths = token_lengths(arrays)
    return None if lengths is None else np.argsort(lengths, kind="stable")


def cached_teacher_outputs(
    teacher: Any,
    arrays: dict[str, np.ndarray],
    *,
    key: str,
    cache_dir: Path | None,
    batch_size: int,
    hint_layer: str | None = None,
    callbacks: Callbacks | None = None,
    limits: TeacherPassLimits | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Teacher outputs from ``cache_dir`` when present there, else computed and stored."""
    if cache_dir is not None:
        outputs_path, features_path = _entry_paths(cache_dir, key, hint_layer)
        if outputs_path.exists() and (hint_layer is None or features_path.exists()):
            outputs = np.load(outputs_path, allow_pickle=False)
            features = np.load(features_path, allow_pickle=False) if hint_layer else None
            if callbacks:
                callbacks.event("stage", {"stage": "teacher_outputs", "cached": True})
            return outputs, features
    outputs, features = compute_teacher_outputs(
        teacher, arrays, batch_size=batch_size, hint_layer=hint_layer, limits=limits
    )
    if callbacks:
        callbacks.event("stage", {"stage": "teacher_outputs", "cached": False})
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_npy(outputs_path, outputs)
        if features is not None:
            _atomic_npy(features_path, features)
    return outputs, features


def _entry_paths(cache_dir: Path, key: str, hint_layer: str | None) -> tuple[Path, Path]:
    """Where one entry's outputs and features live; features depend on the layer too."""
    suffix = f"-{hashlib.sha256(hint_layer.encode()).hexdigest()[:12]}" if hint_layer else ""
    return cache_dir / f"{key}.outputs.npy", cache_dir / f"{key}{suffix}.features.npy"


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        np.save(file, array, allow_pickle=False)
    os.replace(temporary, path)
