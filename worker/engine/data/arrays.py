"""Readers of numeric arrays: ``npz`` (``numpy.savez``, never unpickled) and ``safetensors``.

Both hold an array ``inputs`` and optional ``labels`` (an ``npz`` may add string
``class_names``); the rank of ``inputs`` decides the modality.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine import archive
from worker.engine.data.labels import check_class_ids, check_targets
from worker.engine.data.registry import DATASET_READERS, DEFAULT_DATA_LIMITS, DataLimits
from worker.engine.data.transfer_set import FIELD, Modality, TransferSet
from worker.engine.errors import DatasetInvalid
from worker.engine.layout import TO_CHANNELS_FIRST, channels_last
from worker.engine.spec import DataSpec


@DATASET_READERS.register("npz")
def read_npz(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Arrays ``inputs``, optional ``labels`` and ``class_names`` from a ``.npz``; no pickle.

    Every member is read through :func:`archive.open_member` under one budget, and
    the arrays' declared sizes are checked against it before any data is read.
    """
    members = {
        info.filename[: -len(".npy")]: info
        for info in archive.list_members(path, limits.archive)
        if info.filename.endswith(".npy")
    }
    if "inputs" not in members:
        raise DatasetInvalid(
            f"the .npz has no array 'inputs' (arrays: {', '.join(members) or 'none'})",
            field=FIELD,
        )
    wanted = [name for name in ("inputs", "labels", "class_names") if name in members]
    budget = archive.ExpansionBudget(path, limits.archive)
    declared = {name: _npy_header(path, members[name], budget, limits) for name in wanted}
    total = sum(dtype.itemsize * math.prod(shape) for shape, dtype in declared.values())
    cap = limits.decoded_cap(path.stat().st_size)
    if total > cap:
        raise DatasetInvalid(
            f"the arrays declare {total} bytes, more than this {path.stat().st_size}-byte "
            f"file may expand to ({cap} bytes: {limits.archive.max_ratio:g} times its size)",
            field=FIELD,
        )
    arrays = {name: _npy_data(path, members[name], budget) for name in wanted}
    names = arrays.get("class_names")
    class_names = None
    if names is not None:
        if names.dtype.kind != "U" or names.ndim != 1:
            raise DatasetInvalid("array 'class_names' must be a 1-D array of strings", field=FIELD)
        class_names = [str(name) for name in names]
    return _numeric_transfer_set(arrays["inputs"], arrays.get("labels"), limits, class_names)


@DATASET_READERS.register("safetensors")
def read_safetensors(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Tensors ``inputs`` and optional ``labels`` from a safetensors file (others are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as file:
            names = list(file.keys())
            if "inputs" not in names:
                raise DatasetInvalid(
                    "the safetensors file has no tensor 'inputs' "
                    f"(tensors: {', '.join(sorted(names)) or 'none'})",
                    field=FIELD,
                )
            wanted = [name for name in ("inputs", "labels") if name in names]
            for name in wanted:
                _check_declared_shape(name, tuple(file.get_slice(name).get_shape()), limits)
            tensors = {name: file.get_tensor(name) for name in wanted}
    except DatasetInvalid:
        raise
    except Exception as exc:  # safetensors raises its own error types, and TypeError for bf16
        raise DatasetInvalid(f"not a readable safetensors file: {exc}", field=FIELD) from None
    return _numeric_transfer_set(tensors["inputs"], tensors.get("labels"), limits)


def _npy_header(
    path: Path, info: zipfile.ZipInfo, budget: archive.ExpansionBudget, limits: DataLimits
) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """(shape, dtype) from one member's .npy header, checked; no data is read."""
    name = info.filename[: -len(".npy")]
    npy_format = np.lib.format
    with archive.open_member(path, info, budget) as file:
        try:
            version = npy_format.read_magic(file)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(file)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(file)
            else:
                raise ValueError(f".npy format version {version} is not supported")
        except ValueError as exc:
            raise DatasetInvalid(
                f"array {name!r} has a malformed header: {exc}", field=FIELD
            ) from None
    if dtype.hasobject:
        raise _object_array(name)
    _check_declared_shape(name, tuple(shape), limits)
    return tuple(shape), dtype


def _npy_data(path: Path, info: zipfile.ZipInfo, budget: archive.ExpansionBudget) -> np.ndarray:
    """One member's array, read in chunks under ``budget``; object arrays are never unpickled."""
    name = info.filename[: -len(".npy")]
    with archive.open_member(path, info, budget) as file:
        try:
            return np.asarray(np.lib.format.read_array(file, allow_pickle=False))
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise _object_array(name) from None
            raise DatasetInvalid(f"array {name!r} cannot be read: {exc}", field=FIELD) from None
        except (OSError, EOFError) as exc:
            raise DatasetInvalid(f"array {name!r} cannot be read: {exc}", field=FIELD) from None


def _check_declared_shape(name: str, shape: tuple[int, ...], limits: DataLimits) -> None:
    """Refuse an array over the caps from its header, before its data is loaded."""
    if not shape:
        return  # a scalar: refused with a clearer message once loaded
    if shape[0] > limits.max_rows:
        raise DatasetInvalid(
            f"array {name!r} has {shape[0]} rows; the limit is {limits.max_rows}", field=FIELD
        )
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    if name == "inputs" and per_row > limits.max_features:
        raise DatasetInvalid(
            f"array 'inputs' has {per_row} values per row; the limit is {limits.max_features}",
            field=FIELD,
        )


def _object_array(name: str) -> DatasetInvalid:
    return DatasetInvalid(
        f"array {name!r} is an object array, which would need unpickling (it can run arbitrary "
        "code); store plain numeric arrays",
        field=FIELD,
    )


def _numeric_transfer_set(
    inputs: np.ndarray,
    labels: np.ndarray | None,
    limits: DataLimits,
    class_names: list[str] | None = None,
) -> TransferSet:
    """Validate ``inputs``/``labels`` arrays and infer the modality from the rank."""
    features, modality = _checked_inputs(inputs, limits)
    rows = len(features)
    valid_labels = None if labels is None else _checked_labels(labels, rows)
    if class_names is not None and (valid_labels is None or valid_labels.dtype != np.int64):
        class_names = None
    if (
        class_names is not None
        and valid_labels is not None
        and len(valid_labels)
        and valid_labels.max() >= len(class_names)
    ):
        raise DatasetInvalid(
            f"array 'labels' has class id {int(valid_labels.max())} but 'class_names' names only "
            f"{len(class_names)} classes",
            field=FIELD,
        )
    return TransferSet(
        arrays={"inputs": features},
        labels=valid_labels,
        modality=modality,
        class_names=class_names,
    )


def _checked_inputs(inputs: np.ndarray, limits: DataLimits) -> tuple[np.ndarray, Modality]:
    """``inputs`` as float32 (images NCHW) and its modality, after every check on it."""
    if inputs.dtype.kind not in "biuf":
        raise DatasetInvalid(
            f"array 'inputs' has dtype {inputs.dtype}; it must be numeric", field=FIELD
        )
    if inputs.ndim == 0 or len(inputs) == 0:
        raise DatasetInvalid("array 'inputs' has no rows", field=FIELD)
    if inputs.ndim == 1:
        inputs = inputs.reshape(-1, 1)
    if inputs.ndim > 4:
        raise DatasetInvalid(
            f"array 'inputs' has shape {list(inputs.shape)}; expected (N, F) tabular, "
            "(N, T, F) sequences or (N, C, H, W) images",
            field=FIELD,
        )
    rows = len(inputs)
    if rows > limits.max_rows:
        raise DatasetInvalid(f"{rows} rows; the limit is {limits.max_rows}", field=FIELD)
    per_row = int(np.prod(inputs.shape[1:]))
    if per_row == 0 or per_row > limits.max_features:
        raise DatasetInvalid(
            f"array 'inputs' has {per_row} values per row; expected 1 to {limits.max_features}",
            field=FIELD,
        )
    features = inputs.astype(np.float32, copy=False)
    bad_row = _first_non_finite_row(features)
    if bad_row is not None:
        raise DatasetInvalid(
            f"array 'inputs' has a NaN or infinite value in row {bad_row}", field=FIELD
        )
    if features.ndim == 3:
        return features, "sequence"
    if features.ndim == 4:
        return _as_channels_first(features), "image"
    return features, "tabular"


def _first_non_finite_row(features: np.ndarray) -> int | None:
    """Index of the first row holding NaN or infinity, checked in bounded chunks."""
    flat = features.reshape(len(features), -1)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    for start in range(0, len(flat), step):
        finite = np.isfinite(flat[start : start + step]).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def _as_channels_first(images: np.ndarray) -> np.ndarray:
    """Rank-4 inputs as NCHW (see :mod:`worker.engine.layout`); NHWC is recognised by a
    trailing 1/3/4 channel axis."""
    if channels_last(images.shape[1:]):
        return np.ascontiguousarray(images.transpose(TO_CHANNELS_FIRST))
    return images


def _checked_labels(labels: np.ndarray, rows: int, what: str = "array 'labels'") -> np.ndarray:
    """``labels`` as int64 class ids (1-D) or float32 targets (N,) / (N, D), checked."""
    if labels.dtype.kind not in "biuf":
        raise DatasetInvalid(
            f"{what} has dtype {labels.dtype}; expected integer class ids or float targets",
            field=FIELD,
        )
    if labels.ndim == 0 or len(labels) != rows:
        got = "a scalar" if labels.ndim == 0 else f"{len(labels)} rows"
        raise DatasetInvalid(f"{what} has {got} but 'inputs' has {rows}", field=FIELD)
    if labels.dtype.kind in "biu":
        if labels.ndim != 1:
            raise DatasetInvalid(
                f"{what} holds integers of shape {list(labels.shape)}; integer labels must be "
                "1-D class ids (use float labels for multi-output regression targets)",
                field=FIELD,
            )
        ids = labels.astype(np.int64)
        check_class_ids(ids, what, first_row=0)
        return ids
    if labels.ndim > 2:
        raise DatasetInvalid(
            f"{what} has shape {list(labels.shape)}; targets must be (N,) or (N, D)", field=FIELD
        )
    targets = labels.astype(np.float32, copy=False)
    check_targets(targets, what, first_row=0)
    return targets
