"""The teacher's outputs over the transfer set, computed once and cached on disk.

An entry is keyed by the teacher, the transfer set and how it was prepared,
and stored as plain ``.npy`` (read with ``allow_pickle=False``), written to a
temporary name and renamed, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


@torch.no_grad()
def compute_teacher_outputs(
    teacher: Any,
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    hint_layer: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the teacher once over ``arrays``: (outputs, hint features or None), float32 on CPU."""
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    outputs: list[np.ndarray] = []
    features: list[np.ndarray] = []
    for _, batch in iter_batches(tensors, batch_size):
        batch = {name: value.to(teacher.device) for name, value in batch.items()}
        if hint_layer is None:
            output = teacher.predict(batch)
        else:
            output, feature = teacher.predict_with_features(batch, hint_layer)
            features.append(feature.float().cpu().numpy())
        outputs.append(output.float().cpu().numpy())
    all_outputs = np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
    return all_outputs, (np.concatenate(features) if features else None)


def cached_teacher_outputs(
    teacher: Any,
    arrays: dict[str, np.ndarray],
    *,
    key: str,
    cache_dir: Path | None,
    batch_size: int,
    hint_layer: str | None = None,
    callbacks: Callbacks | None = None,
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
        teacher, arrays, batch_size=batch_size, hint_layer=hint_layer
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
