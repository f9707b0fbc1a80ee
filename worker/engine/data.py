"""Transfer sets: a dataset file read into arrays the engine can batch.

The format is recognised from the file's content (magic bytes and structure),
never from its name, and one reader per format is registered in
:data:`DATASET_READERS`. Every reader validates what it reads and raises
:class:`DatasetInvalid` naming the array, column, line or member at fault.

Formats:

* ``npz``: a zip of ``.npy`` members (``numpy.savez``); arrays ``inputs`` and
  optional ``labels`` (and optional string ``class_names``). Never unpickled.
* ``safetensors``: tensors ``inputs`` and optional ``labels``.
* ``csv`` / ``parquet``: numeric feature columns and an optional label column.
* ``jsonl``: one object per line with ``text`` and optional ``label``.
* ``image_folders``: a zip with one folder of PNG/JPEG images per class.

Labels are optional, wholly or row by row: a row without one holds class id
:data:`UNLABELLED` (-1), or NaN for regression targets.

This module imports no torch: the API calls :func:`inspect_dataset`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol

import numpy as np

from worker.engine import archive
from worker.engine.errors import DatasetInvalid, UnsupportedFormat
from worker.engine.registry import Registry
from worker.engine.spec import DataSpec

Modality = Literal["tabular", "image", "sequence", "text"]

#: ``field`` of content errors; the message names the array, column, line or member.
FIELD = "dataset"

FORMAT_NAMES = {
    "npz": "NumPy .npz (arrays 'inputs', 'labels')",
    "safetensors": "safetensors (tensors 'inputs', 'labels')",
    "csv": "CSV with a header row",
    "parquet": "Parquet",
    "jsonl": "JSON Lines ('text', 'label')",
    "image_folders": "zip of image folders (one per class)",
}

_NPY_MAGIC = b"\x93NUMPY"
_IMAGE_FORMATS = ("PNG", "JPEG")
_SNIFF_BYTES = 4096
_CSV_HEADER_BYTES = 64 << 20


@dataclass(frozen=True)
class DataLimits:
    """Caps on what a reader accepts, so a hostile file fails early and clearly."""

    max_rows: int = 50_000_000
    max_features: int = 16_000_000  # values per row: the product of the per-sample shape
    max_line_bytes: int = 1 << 20  # one JSONL line
    max_image_pixels: int = 4096 * 4096  # one image as stored, before resizing
    max_image_bytes: int = 256 << 20  # one encoded image member
    max_array_bytes: int = 64 << 30  # the decoded image array, checked before allocating


DEFAULT_DATA_LIMITS = DataLimits()

#: The class id of a row without a label (targets use NaN).
UNLABELLED = -1


@dataclass
class TransferSet:
    """The inputs the teacher labels and the student learns from.

    ``arrays`` maps batch keys (``inputs``; or ``input_ids``/``attention_mask``
    for tokenized text) to arrays whose first axis is the sample. Text sets
    hold ``texts`` and empty ``arrays`` until :func:`tokenize`. Labels may be
    partial: class id ``UNLABELLED`` (-1) or NaN targets mark rows without one.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None  # int64 (N,) class ids, or float32 (N,) / (N, D) targets;
    # a row without a label holds class id -1 (NaN for targets)
    modality: Modality
    texts: list[str] | None = None
    class_names: list[str] | None = None
    digest: str = ""

    def __len__(self) -> int:
        if self.arrays:
            return int(next(iter(self.arrays.values())).shape[0])
        if self.texts is not None:
            return len(self.texts)
        return 0 if self.labels is None else len(self.labels)

    @property
    def label_kind(self) -> Literal["class", "value"] | None:
        """``class`` for integer class ids, ``value`` for regression targets."""
        if self.labels is None:
            return None
        return "class" if np.issubdtype(self.labels.dtype, np.integer) else "value"

    @property
    def num_classes(self) -> int | None:
        """Classes named, else one past the largest class id; ``None`` without class labels."""
        if self.label_kind != "class" or self.labels is None:
            return None
        if self.class_names is not None:
            return len(self.class_names)
        top = int(self.labels.max()) if len(self.labels) else UNLABELLED
        return None if top == UNLABELLED else top + 1

    @property
    def labelled_rows(self) -> int:
        """Rows that carry a label."""
        if self.labels is None:
            return 0
        if self.label_kind == "class":
            return int((self.labels != UNLABELLED).sum())
        return int((~np.isnan(self.labels.reshape(len(self.labels), -1)).any(axis=1)).sum())

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of ``inputs`` (or ``input_ids``); ``None`` for untokenized text."""
        key = "inputs" if "inputs" in self.arrays else "input_ids"
        if key not in self.arrays:
            return None
        return tuple(int(d) for d in self.arrays[key].shape[1:])

    def subset(self, indices: np.ndarray) -> TransferSet:
        """The rows at ``indices``, in that order (a copy)."""
        idx = np.asarray(indices, dtype=np.int64)
        digest = ""
        if self.digest:
            # A subset must not share its parent's digest, or cached teacher outputs mix up.
            digest = hashlib.sha256(self.digest.encode() + idx.tobytes()).hexdigest()
        return TransferSet(
            arrays={k: v[idx] for k, v in self.arrays.items()},
            labels=None if self.labels is None else self.labels[idx],
            modality=self.modality,
            texts=None if self.texts is None else [self.texts[i] for i in idx.tolist()],
            class_names=self.class_names,
            digest=digest,
        )


class DatasetReader(Protocol):
    def __call__(
        self, path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
    ) -> TransferSet: ...


DATASET_READERS = Registry[DatasetReader]("dataset format")


# --- sniffing -------------------------------------------------------------------------------


def _unrecognised() -> UnsupportedFormat:
    expected = "; ".join(FORMAT_NAMES.values())
    return UnsupportedFormat(
        f"unrecognised dataset format; expected one of: {expected}", field=FIELD
    )


def _as_text(head: bytes, complete: bool) -> str | None:
    """``head`` decoded as UTF-8 if it looks like text, else ``None``."""
    if b"\x00" in head:
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The sniffed prefix may cut a multi-byte character in two at its end.
        if not complete and exc.start >= len(head) - 3:
            return head[: exc.start].decode("utf-8", errors="strict")
        return None


def sniff_dataset(path: str | Path) -> str:
    """The format name of the dataset at ``path``, from its content.

    Raises :class:`UnsupportedFormat` for pickled or unrecognised files,
    :class:`DatasetInvalid` for empty ones, and
    :class:`ArchiveUnsafe` for unsafe zips.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetInvalid(f"dataset file {path.name!r} does not exist", field=FIELD)
    size = path.stat().st_size
    if size == 0:
        raise DatasetInvalid("the dataset file is empty", field=FIELD)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith((archive.ZIP_MAGIC, b"PK\x05\x06")):
        return _sniff_zip(path)
    if head.startswith(b"PAR1"):
        return "parquet"
    if len(head) > 8 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= size - 8:
            return "safetensors"
    if head.startswith(_NPY_MAGIC):
        raise DatasetInvalid(
            "a single .npy array is not a dataset; save with "
            "numpy.savez(path, inputs=..., labels=...)",
            field=FIELD,
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise UnsupportedFormat(
            "pickle files are refused: unpickling can run arbitrary code. Save the arrays "
            "with numpy.savez(path, inputs=..., labels=...) or as safetensors, CSV or Parquet",
            field=FIELD,
        )
    text = _as_text(head, complete=size <= _SNIFF_BYTES)
    if text is None:
        raise _unrecognised()
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise DatasetInvalid("the dataset file holds only whitespace", field=FIELD)
    return "jsonl" if stripped.startswith("{") else "csv"


def _sniff_zip(path: Path) -> str:
    members = archive.list_members(path)
    if not members:
        raise DatasetInvalid("the zip archive holds no files", field=FIELD)
    if all(m.filename.endswith(".npy") for m in members):
        with zipfile.ZipFile(path) as zf, zf.open(members[0]) as f:
            if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                return "npz"
    return "image_folders"


# --- numeric arrays (npz, safetensors) ------------------------------------------------------


def _first_bad_row(x: np.ndarray) -> int | None:
    """Index of the first row holding NaN or infinity, checked in bounded chunks."""
    flat = x.reshape(len(x), -1)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    for start in range(0, len(flat), step):
        ok = np.isfinite(flat[start : start + step]).all(axis=1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def _as_images(x: np.ndarray) -> np.ndarray:
    """Rank-4 inputs as NCHW; NHWC is recognised by a trailing 1/3/4 channel axis."""
    if x.shape[1] not in (1, 3, 4) and x.shape[3] in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _labels_array(labels: np.ndarray, n: int, what: str = "array 'labels'") -> np.ndarray:
    if labels.dtype.kind not in "biuf":
        raise DatasetInvalid(
            f"{what} has dtype {labels.dtype}; expected integer class ids or float targets",
            field=FIELD,
        )
    if labels.ndim == 0 or len(labels) != n:
        got = "a scalar" if labels.ndim == 0 else f"{len(labels)} rows"
        raise DatasetInvalid(f"{what} has {got} but 'inputs' has {n}", field=FIELD)
    if labels.dtype.kind in "biu":
        if labels.ndim != 1:
            raise DatasetInvalid(
                f"{what} holds integers of shape {list(labels.shape)}; integer labels must be "
                "1-D class ids (use float labels for multi-output regression targets)",
                field=FIELD,
            )
        ids = labels.astype(np.int64)
        _check_class_ids(ids, what, first_row=0)
        return ids
    if labels.ndim > 2:
        raise DatasetInvalid(
            f"{what} has shape {list(labels.shape)}; targets must be (N,) or (N, D)", field=FIELD
        )
    targets = labels.astype(np.float32, copy=False)
    _check_targets(targets, what, first_row=0)
    return targets


def _check_class_ids(ids: np.ndarray, what: str, first_row: int) -> None:
    if len(ids) and ids.min() < UNLABELLED:
        row = int(np.argmin(ids))
        raise DatasetInvalid(
            f"{what} has a negative class id {int(ids[row])} in row {row + first_row} "
            f"(only {UNLABELLED} is allowed: it marks a row without a label)",
            field=FIELD,
        )


def _check_targets(targets: np.ndarray, what: str, first_row: int) -> None:
    """NaN marks a row without a label; infinity is refused."""
    infinite = np.isinf(targets.reshape(len(targets), -1)).any(axis=1)
    if infinite.any():
        row = int(np.argmax(infinite)) + first_row
        raise DatasetInvalid(f"{what} has an infinite value in row {row}", field=FIELD)


def _numeric_transfer_set(
    inputs: np.ndarray,
    labels: np.ndarray | None,
    limits: DataLimits,
    class_names: list[str] | None = None,
) -> TransferSet:
    """Validate ``inputs``/``labels`` arrays and infer the modality from the rank."""
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
    n = len(inputs)
    if n > limits.max_rows:
        raise DatasetInvalid(f"{n} rows; the limit is {limits.max_rows}", field=FIELD)
    per_row = int(np.prod(inputs.shape[1:]))
    if per_row == 0 or per_row > limits.max_features:
        raise DatasetInvalid(
            f"array 'inputs' has {per_row} values per row; expected 1 to {limits.max_features}",
            field=FIELD,
        )
    x = inputs.astype(np.float32, copy=False)
    bad = _first_bad_row(x)
    if bad is not None:
        raise DatasetInvalid(
            f"array 'inputs' has a NaN or infinite value in row {bad}", field=FIELD
        )
    modality: Modality = "tabular"
    if x.ndim == 3:
        modality = "sequence"
    elif x.ndim == 4:
        modality = "image"
        x = _as_images(x)
    y = None if labels is None else _labels_array(labels, n)
    if class_names is not None and (y is None or y.dtype != np.int64):
        class_names = None
    if class_names is not None and y is not None and len(y) and y.max() >= len(class_names):
        raise DatasetInvalid(
            f"array 'labels' has class id {int(y.max())} but 'class_names' names only "
            f"{len(class_names)} classes",
            field=FIELD,
        )
    return TransferSet(arrays={"inputs": x}, labels=y, modality=modality, class_names=class_names)


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


def _npz_precheck(path: Path, names: list[str], limits: DataLimits) -> None:
    """Check each named member's .npy header (dtype, shape) without loading its data."""
    fmt = np.lib.format
    with zipfile.ZipFile(path) as zf:
        for name in names:
            with zf.open(f"{name}.npy") as f:
                try:
                    version = fmt.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = fmt.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = fmt.read_array_header_2_0(f)
                    else:
                        continue  # newer headers are still checked once loaded
                except ValueError as exc:
                    raise DatasetInvalid(
                        f"array {name!r} has a malformed header: {exc}", field=FIELD
                    ) from None
            if dtype.hasobject:
                raise _object_array(name)
            _check_declared_shape(name, tuple(shape), limits)


@DATASET_READERS.register("npz")
def read_npz(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Arrays ``inputs``, optional ``labels`` and ``class_names`` from a ``.npz``; no pickle."""

    def member(npz: Any, name: str) -> np.ndarray:
        try:
            return np.asarray(npz[name])
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise _object_array(name) from None
            raise DatasetInvalid(f"array {name!r} cannot be read: {exc}", field=FIELD) from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DatasetInvalid(f"array {name!r} cannot be read: {exc}", field=FIELD) from None

    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetInvalid(f"not a readable .npz file: {exc}", field=FIELD) from None
    with npz:
        if "inputs" not in npz.files:
            raise DatasetInvalid(
                f"the .npz has no array 'inputs' (arrays: {', '.join(npz.files) or 'none'})",
                field=FIELD,
            )
        wanted = [n for n in ("inputs", "labels", "class_names") if n in npz.files]
        _npz_precheck(path, wanted, limits)
        inputs = member(npz, "inputs")
        labels = member(npz, "labels") if "labels" in npz.files else None
        names = member(npz, "class_names") if "class_names" in npz.files else None
    class_names = None
    if names is not None:
        if names.dtype.kind != "U" or names.ndim != 1:
            raise DatasetInvalid("array 'class_names' must be a 1-D array of strings", field=FIELD)
        class_names = [str(s) for s in names]
    return _numeric_transfer_set(inputs, labels, limits, class_names)


@DATASET_READERS.register("safetensors")
def read_safetensors(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Tensors ``inputs`` and optional ``labels`` from a safetensors file (others are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
            if "inputs" not in names:
                raise DatasetInvalid(
                    "the safetensors file has no tensor 'inputs' "
                    f"(tensors: {', '.join(sorted(names)) or 'none'})",
                    field=FIELD,
                )
            wanted = [n for n in ("inputs", "labels") if n in names]
            for name in wanted:
                _check_declared_shape(name, tuple(f.get_slice(name).get_shape()), limits)
            tensors = {name: f.get_tensor(name) for name in wanted}
    except DatasetInvalid:
        raise
    except Exception as exc:  # safetensors raises its own error types, and TypeError for bf16
        raise DatasetInvalid(f"not a readable safetensors file: {exc}", field=FIELD) from None
    return _numeric_transfer_set(tensors["inputs"], tensors.get("labels"), limits)


# --- columns (csv, parquet) -----------------------------------------------------------------


def _select_columns(names: list[str], options: DataSpec) -> tuple[list[str], str | None]:
    """(feature columns, label column or ``None``) for a table with columns ``names``."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetInvalid(f"column names repeat: {', '.join(dupes)}", field=FIELD)
    label = options.label_column
    if label is not None and label not in names:
        if "label_column" in options.model_fields_set:
            raise DatasetInvalid(
                f"label column {label!r} is not in the file (columns: {', '.join(names)})",
                field="data.label_column",
            )
        label = None
    if options.feature_columns is not None:
        unknown = [c for c in options.feature_columns if c not in names]
        if unknown:
            raise DatasetInvalid(
                f"feature column(s) {', '.join(map(repr, unknown))} not in the file "
                f"(columns: {', '.join(names)})",
                field="data.feature_columns",
            )
        if label is not None and label in options.feature_columns:
            raise DatasetInvalid(
                f"the label column {label!r} is also listed as a feature",
                field="data.feature_columns",
            )
        features = list(dict.fromkeys(options.feature_columns))
    else:
        features = [c for c in names if c != label]
    if not features:
        raise DatasetInvalid("the file has no feature columns", field=FIELD)
    return features, label


def _first_null(column: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.index(pc.is_null(column), True).as_py())


def _feature_values(column: Any, name: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_decimal(t):
        column = pc.cast(column, pa.float64())
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DatasetInvalid(
            f"feature column {name!r} is not numeric ({t}); encode it as numbers or list the "
            "numeric columns in data.feature_columns",
            field=FIELD,
        )
    if column.null_count:
        raise DatasetInvalid(
            f"feature column {name!r} has a missing value in row {_first_null(column) + 1}",
            field=FIELD,
        )
    values = np.asarray(column.to_numpy(), dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        row = int(np.argmin(finite)) + 1
        raise DatasetInvalid(
            f"feature column {name!r} has a NaN or infinite value in row {row}", field=FIELD
        )
    return values


def _label_values(column: Any, name: str) -> tuple[np.ndarray | None, list[str] | None]:
    """(labels, class names) from the label column; empty cells are rows without a label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    what = f"label column {name!r}"
    t = column.type
    if pa.types.is_null(t):
        return None, None  # no cell holds a label
    if pa.types.is_dictionary(t):
        column = pc.cast(column, t.value_type)
        t = column.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        class_names = sorted(str(v) for v in pc.unique(column.drop_null()).to_pylist())
        ids = pc.index_in(column, value_set=pa.array(class_names, type=t))
        return pc.fill_null(ids, UNLABELLED).to_numpy().astype(np.int64), class_names
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        ids = pc.fill_null(pc.cast(column, pa.int64()), UNLABELLED).to_numpy().astype(np.int64)
        _check_class_ids(ids, what, first_row=1)
        return ids, None
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        targets = np.asarray(
            pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float32
        )
        _check_targets(targets, what, first_row=1)
        return targets, None
    raise DatasetInvalid(
        f"{what} has type {t}; expected class names, class ids or numbers", field=FIELD
    )


def _table_transfer_set(
    table: Any, features: list[str], label: str | None, limits: DataLimits
) -> TransferSet:
    n = table.num_rows
    if n == 0:
        raise DatasetInvalid("the file has no rows", field=FIELD)
    if n > limits.max_rows:
        raise DatasetInvalid(f"{n} rows; the limit is {limits.max_rows}", field=FIELD)
    x = np.empty((n, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        x[:, j] = _feature_values(table.column(name), name)
    labels, class_names = (
        (None, None) if label is None else _label_values(table.column(label), label)
    )
    return TransferSet(
        arrays={"inputs": x}, labels=labels, modality="tabular", class_names=class_names
    )


def _check_feature_count(features: list[str], limits: DataLimits) -> None:
    if len(features) > limits.max_features:
        raise DatasetInvalid(
            f"{len(features)} feature columns; the limit is {limits.max_features}", field=FIELD
        )


def _csv_delimiter(lines: list[str]) -> str:
    """The delimiter that splits every sampled line into the same number (> 1) of fields."""
    best, best_fields = ",", 1
    for delimiter in (",", ";", "\t"):
        counts = {len(row) for row in csv.reader(lines, delimiter=delimiter)}
        if len(counts) == 1 and (fields := counts.pop()) > best_fields:
            best, best_fields = delimiter, fields
    return best


def _csv_header(path: Path) -> tuple[str, list[str]]:
    """(delimiter, column names) from the first lines of a CSV file."""
    lines: list[str] = []
    with open(path, "rb") as f:
        # The header can be long (one name per feature), so read whole lines, not a prefix.
        while len(lines) < 6 and (raw := f.readline(_CSV_HEADER_BYTES + 1)):
            if len(raw) > _CSV_HEADER_BYTES:
                raise DatasetInvalid(
                    f"CSV line {len(lines) + 1} is longer than {_CSV_HEADER_BYTES} bytes",
                    field=FIELD,
                )
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DatasetInvalid(
                    f"CSV line {len(lines) + 1} is not UTF-8 text", field=FIELD
                ) from None
            if line.strip():
                lines.append(line.lstrip("\ufeff") if not lines else line)
    if not lines:
        raise DatasetInvalid("the CSV file has no header row", field=FIELD)
    delimiter = _csv_delimiter(lines)
    header = next(csv.reader(lines[:1], delimiter=delimiter))

    def is_number(s: str) -> bool:
        try:
            float(s)
        except ValueError:
            return False
        return True

    if all(is_number(h) for h in header):
        raise DatasetInvalid(
            "the CSV's first row is all numbers; a header row naming the columns is required",
            field=FIELD,
        )
    return delimiter, header


@DATASET_READERS.register("csv")
def read_csv(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Numeric feature columns and an optional label column from a CSV with a header row."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    delimiter, header = _csv_header(path)
    features, label = _select_columns(header, options)
    _check_feature_count(features, limits)
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                include_columns=[*features, *([label] if label else [])],
                strings_can_be_null=True,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise DatasetInvalid(f"the CSV file cannot be parsed: {exc}", field=FIELD) from None
    return _table_transfer_set(table, features, label, limits)


@DATASET_READERS.register("parquet")
def read_parquet(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Numeric feature columns and an optional label column from a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
        rows = pf.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DatasetInvalid(f"not a readable Parquet file: {exc}", field=FIELD) from None
    if rows > limits.max_rows:
        raise DatasetInvalid(f"{rows} rows; the limit is {limits.max_rows}", field=FIELD)
    features, label = _select_columns(names, options)
    _check_feature_count(features, limits)
    try:
        table = pf.read(columns=[*features, *([label] if label else [])])
    except (pa.ArrowException, OSError) as exc:
        raise DatasetInvalid(f"the Parquet file cannot be read: {exc}", field=FIELD) from None
    return _table_transfer_set(table, features, label, limits)


# --- text (jsonl) ---------------------------------------------------------------------------


@DATASET_READERS.register("jsonl")
def read_jsonl(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Texts and optional labels from JSON Lines: ``{"text": "...", "label": 3 or "name"}``.

    A line without ``label`` (or with ``null``) is a row without a label.
    """
    texts: list[str] = []
    labels: list[int | float | str | None] = []
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(limits.max_line_bytes + 2):
            lineno += 1
            if len(raw.rstrip(b"\r\n")) > limits.max_line_bytes:
                raise DatasetInvalid(
                    f"line {lineno} is longer than {limits.max_line_bytes} bytes", field=FIELD
                )
            try:
                line = raw.decode("utf-8").lstrip("\ufeff").strip()
            except UnicodeDecodeError:
                raise DatasetInvalid(f"line {lineno} is not UTF-8 text", field=FIELD) from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetInvalid(
                    f"line {lineno} is not valid JSON: {exc.msg} at column {exc.colno}",
                    field=FIELD,
                ) from None
            if not isinstance(obj, dict):
                raise DatasetInvalid(f"line {lineno} is not a JSON object", field=FIELD)
            text = obj.get("text")
            if text is None:
                raise DatasetInvalid(f'line {lineno} has no "text" field', field=FIELD)
            if not isinstance(text, str):
                raise DatasetInvalid(f'line {lineno}: "text" must be a string', field=FIELD)
            label = obj.get("label")
            if label is not None and (
                isinstance(label, bool) or not isinstance(label, int | float | str)
            ):
                raise DatasetInvalid(
                    f'line {lineno}: "label" must be a class name, class id or number',
                    field=FIELD,
                )
            labels.append(label)
            texts.append(text)
            if len(texts) > limits.max_rows:
                raise DatasetInvalid(
                    f"more than {limits.max_rows} rows; that is the limit", field=FIELD
                )
    if not texts:
        raise DatasetInvalid("the JSONL file holds no rows", field=FIELD)
    y, class_names = _text_labels(labels)
    return TransferSet(arrays={}, labels=y, modality="text", texts=texts, class_names=class_names)


def _text_labels(
    labels: list[int | float | str | None],
) -> tuple[np.ndarray | None, list[str] | None]:
    kinds = {type(v) for v in labels if v is not None}
    if not kinds:
        return None, None
    if str in kinds:
        if kinds != {str}:
            raise DatasetInvalid(
                '"label" mixes class names and numbers; use one or the other', field=FIELD
            )
        class_names = sorted({v for v in labels if isinstance(v, str)})
        index = {name: i for i, name in enumerate(class_names)}
        ids = [UNLABELLED if v is None else index[str(v)] for v in labels]
        return np.array(ids, dtype=np.int64), class_names
    if kinds == {int}:
        ids_array = np.array([UNLABELLED if v is None else v for v in labels], dtype=np.int64)
        _check_class_ids(ids_array, '"label"', first_row=1)
        return ids_array, None
    targets = np.array([np.nan if v is None else v for v in labels], dtype=np.float32)
    _check_targets(targets, '"label"', first_row=1)
    return targets, None


def tokenize(
    ts: TransferSet, tokenizer: Any, max_length: int, *, batch_size: int = 4096
) -> TransferSet:
    """A copy of the text set ``ts`` with ``input_ids``/``attention_mask`` (int64, N x L) filled.

    ``tokenizer`` is a Hugging Face tokenizer; texts are padded and truncated to
    ``max_length`` and encoded ``batch_size`` at a time to bound memory.
    ``token_type_ids`` is kept when the tokenizer returns it.
    """
    if ts.texts is None:
        raise DatasetInvalid(
            f"a text teacher needs a text dataset (JSONL); this one is {ts.modality}", field=FIELD
        )
    n = len(ts.texts)
    out: dict[str, np.ndarray] = {}
    for start in range(0, n, batch_size):
        encoded = tokenizer(
            ts.texts[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        parts = {"input_ids": ids}
        # Without a mask from the tokenizer every position is real (all are padded to one length).
        parts["attention_mask"] = np.asarray(
            encoded["attention_mask"] if "attention_mask" in encoded else np.ones_like(ids),
            dtype=np.int64,
        )
        if "token_type_ids" in encoded:
            parts["token_type_ids"] = np.asarray(encoded["token_type_ids"], dtype=np.int64)
        for key, arr in parts.items():
            if key not in out:
                out[key] = np.empty((n, arr.shape[1]), dtype=np.int64)
            out[key][start : start + len(arr)] = arr
    return replace(ts, arrays=out)


# --- images (zip of class folders) ----------------------------------------------------------


def _image_members(infos: list[zipfile.ZipInfo]) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Candidate image members with their paths, metadata folders and hidden files left out."""
    out = []
    for info in infos:
        p = archive.member_path(info.filename)
        if any(part.startswith(".") or part == "__MACOSX" for part in p.parts):
            continue
        out.append((info, p))
    out.sort(key=lambda item: item[1].as_posix())
    return out


def _open_image(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: DataLimits) -> Any:
    """The member as a lazily decoded PIL image, or ``None`` if it is not a PNG/JPEG."""
    from PIL import Image, UnidentifiedImageError

    with zf.open(info) as f:
        data = f.read(limits.max_image_bytes + 1)
    if len(data) > limits.max_image_bytes:
        raise DatasetInvalid(
            f"image {info.filename!r} is over {limits.max_image_bytes} bytes", field=FIELD
        )
    try:
        image = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError:
        image = None  # Pillow's own cap, above ours: the same refusal
    if image is None or image.width * image.height > limits.max_image_pixels:
        raise DatasetInvalid(
            f"image {info.filename!r} is over {limits.max_image_pixels} pixels", field=FIELD
        )
    return image


_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L"}  # 16-bit PNGs
_GRAY_MODES = {"1", "L", "LA", *_WIDE_GRAY_MODES}


def _pixels(image: Any, gray: bool, width: int, height: int) -> np.ndarray:
    """The decoded image as float32 (C, height, width) in [0, 1]."""
    from PIL import Image

    if image.mode in _WIDE_GRAY_MODES:
        # Pillow's conversion of 16-bit gray to 8-bit clips rather than scales.
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)
        scale = 1.0
    else:
        image = image.convert("L" if gray else "RGB")
        scale = 255.0
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)
    if pixels.ndim == 3:
        return pixels.transpose(2, 0, 1)
    return pixels[None] if gray else np.repeat(pixels[None], 3, axis=0)


@DATASET_READERS.register("image_folders")
def read_image_folders(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """PNG/JPEG images from a zip with one folder per class (optionally under one top folder).

    Images become float32 NCHW in [0, 1], resized to ``options.image_size``
    (square) or else to the most common size; 1 channel if every image is
    grayscale, else RGB. Images all at the top level (or in one folder) make an
    unlabelled set.
    """
    members = _image_members(archive.list_members(path))
    with zipfile.ZipFile(path) as zf:
        # First pass reads only headers: sizes and modes decide the output array.
        found: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        sizes: Counter[tuple[int, int]] = Counter()
        gray = True
        for info, p in members:
            image = _open_image(zf, info, limits)
            if image is None:
                continue
            found.append((info, p))
            sizes[image.size] += 1
            gray = gray and image.mode in _GRAY_MODES
            if len(found) > limits.max_rows:
                raise DatasetInvalid(
                    f"more than {limits.max_rows} images; that is the limit", field=FIELD
                )
        if not found:
            raise DatasetInvalid("the zip archive holds no PNG or JPEG images", field=FIELD)
        paths = [p for _, p in found]
        if len({p.parts[0] for p in paths}) == 1 and all(len(p.parts) >= 2 for p in paths):
            # One folder around everything is a wrapper, not a class: one class teaches nothing.
            paths = [PurePosixPath(*p.parts[1:]) for p in paths]
        depths = {len(p.parts) >= 2 for p in paths}
        if depths == {True, False}:
            loose = next(p for p in paths if len(p.parts) == 1)
            raise DatasetInvalid(
                f"image {loose.as_posix()!r} is outside the class folders; put every image in "
                "its class's folder (or none in folders, for an unlabelled set)",
                field=FIELD,
            )
        width, height = (
            (options.image_size, options.image_size)
            if options.image_size is not None
            else sizes.most_common(1)[0][0]
        )
        channels = 1 if gray else 3
        if channels * height * width > limits.max_features:
            raise DatasetInvalid(
                f"images of {channels}x{height}x{width} values are over the limit of "
                f"{limits.max_features} per image; set data.image_size",
                field="data.image_size",
            )
        total = len(found) * channels * height * width * 4
        if total > limits.max_array_bytes:
            raise DatasetInvalid(
                f"{len(found)} images of {channels}x{height}x{width} need {total} bytes; the "
                f"limit is {limits.max_array_bytes}; set a smaller data.image_size",
                field="data.image_size",
            )
        x = np.empty((len(found), channels, height, width), dtype=np.float32)
        for i, (info, _) in enumerate(found):
            try:
                x[i] = _pixels(_open_image(zf, info, limits), gray, width, height)
            except (OSError, SyntaxError, ValueError) as exc:  # a truncated or corrupt body
                raise DatasetInvalid(
                    f"image {info.filename!r} cannot be decoded: {exc}", field=FIELD
                ) from None
    if depths == {False}:
        return TransferSet(arrays={"inputs": x}, labels=None, modality="image")
    folders = [p.parts[0] for p in paths]
    class_names = sorted(set(folders))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[f] for f in folders], dtype=np.int64)
    return TransferSet(
        arrays={"inputs": x}, labels=labels, modality="image", class_names=class_names
    )


# --- entry points ---------------------------------------------------------------------------


def dataset_digest(path: str | Path, options: DataSpec) -> str:
    """sha256 of the file's bytes followed by the reader options as canonical JSON."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    h.update(json.dumps(options.model_dump(mode="json"), sort_keys=True).encode())
    return h.hexdigest()


def load_transfer_set(
    path: str | Path,
    options: DataSpec | None = None,
    *,
    limits: DataLimits = DEFAULT_DATA_LIMITS,
) -> TransferSet:
    """Read the dataset at ``path``, its format recognised from its content."""
    path = Path(path)
    options = options or DataSpec()
    reader = DATASET_READERS.get(sniff_dataset(path))
    ts = reader(path, options, limits)
    ts.digest = dataset_digest(path, options)
    return ts


def split(ts: TransferSet, validation_split: float, seed: int) -> tuple[TransferSet, TransferSet]:
    """(train, validation) subsets, deterministic for a given ``seed``.

    The validation set holds ``max(1, round(N * validation_split))`` rows. With
    class labels where every class has at least two rows the split is
    stratified: each class gives its share, and keeps at least one training row.
    """
    n = len(ts)
    if not 0.0 < validation_split < 1.0:
        raise DatasetInvalid(
            f"validation_split must be between 0 and 1, not {validation_split}",
            field="evaluation.validation_split",
        )
    n_val = max(1, round(n * validation_split))
    if n - n_val < 1:
        raise DatasetInvalid(
            f"{n} row(s) cannot be split into training and validation sets; at least 2 are needed",
            field=FIELD,
        )
    perm = np.random.default_rng(seed).permutation(n)
    val = _stratified(ts.labels, perm, n_val) if ts.label_kind == "class" else None
    if val is None:
        val = perm[:n_val]
    mask = np.zeros(n, dtype=bool)
    mask[val] = True
    return ts.subset(np.flatnonzero(~mask)), ts.subset(np.flatnonzero(mask))


def _stratified(labels: Any, perm: np.ndarray, n_val: int) -> np.ndarray | None:
    """Validation indices taking each class's share of ``n_val``; ``None`` if not possible."""
    shuffled = labels[perm]
    classes, counts = np.unique(shuffled, return_counts=True)
    if counts.min() < 2:
        return None
    n = len(perm)
    exact = counts * n_val / n
    quota = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    # Largest remainders first (ties to the lower class id), never emptying a class's training.
    for c in np.argsort(-(exact - quota), kind="stable"):
        if quota.sum() >= n_val:
            break
        if quota[c] < counts[c] - 1:
            quota[c] += 1
    if quota.sum() != n_val:
        return None
    picks = [perm[shuffled == c][:q] for c, q in zip(classes, quota, strict=True)]
    return np.concatenate(picks)


def inspect_dataset(
    path: str | Path,
    options: DataSpec | None = None,
    *,
    limits: DataLimits = DEFAULT_DATA_LIMITS,
) -> dict[str, Any]:
    """A summary of the dataset at ``path`` for the API; reads the data, imports no torch.

    Keys: format, rows, modality, feature_shape (per sample; ``None`` for text),
    has_labels, labelled_rows, label_kind (``class``/``value``/``None``),
    num_classes, class_names, bytes.
    """
    path = Path(path)
    fmt = sniff_dataset(path)
    ts = DATASET_READERS.get(fmt)(path, options or DataSpec(), limits)
    shape = ts.feature_shape
    return {
        "format": fmt,
        "rows": len(ts),
        "modality": ts.modality,
        "feature_shape": None if shape is None else list(shape),
        "has_labels": ts.labelled_rows > 0,
        "labelled_rows": ts.labelled_rows,
        "label_kind": ts.label_kind,
        "num_classes": ts.num_classes,
        "class_names": ts.class_names,
        "bytes": path.stat().st_size,
    }
