"""Where a run computes: the device, its autocast dtype, and tensors drawn in batches."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from worker.engine.errors import EngineError

Batch = dict[str, torch.Tensor]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (where supported) under ``auto``; fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    """Autocast to ``dtype`` on ``device``; no autocast when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> Batch:
    """Named numpy arrays as tensors on ``device``."""
    return {
        name: torch.from_numpy(np.ascontiguousarray(array)).to(device)
        for name, array in arrays.items()
    }


def iter_batches(tensors: Batch, batch_size: int) -> Iterator[tuple[int, Batch]]:
    """Consecutive slices of ``batch_size`` rows: (first row, batch)."""
    rows = len(next(iter(tensors.values())))
    for start in range(0, rows, batch_size):
        yield start, {name: value[start : start + batch_size] for name, value in tensors.items()}
