"""Readers of tables: ``csv`` (with a header row) and ``parquet``.

Numeric feature columns become ``inputs``; an optional label column holds class
names, class ids or regression targets, an empty cell marking a row without a label.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.data.labels import check_class_ids, check_targets
from worker.engine.data.registry import DATASET_READERS, DEFAULT_DATA_LIMITS, DataLimits
from worker.engine.data.transfer_set import FIELD, UNLABELLED, TransferSet
from worker.engine.errors import DatasetInvalid
from worker.engine.spec import DataSpec

_CSV_HEADER_BYTES = 64 << 20
_CSV_SAMPLE_LINES = 6  # lines read to tell the delimiter
_NAMES_SHOWN = 20  # column names quoted in a message, of a table that may have thousands


@DATASET_READERS.register("csv")
def read_csv(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Numeric feature columns and an optional label column from a CSV with a header row."""
    import pyarrow as pa

    delimiter, header = _csv_header(path, limits)
    features, label = _select_columns(header, options, limits)
    _check_feature_count(features, limits)
    columns = [*features, *([label] if label else [])]
    try:
        # Features read as float64 first: Arrow's type inference costs far more per column,
        # which shows on wide files. Anything else (booleans, text) is read again, inferred,
        # so the error can name the column at fault.
        table = _read_csv(path, delimiter, columns, dict.fromkeys(features, pa.float64()))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        table = None
    except OSError as exc:
        raise DatasetInvalid(f"the CSV file cannot be parsed: {exc}", field=FIELD) from None
    if table is None:
        try:
            table = _read_csv(path, delimiter, columns, {})
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            raise DatasetInvalid(f"the CSV file cannot be parsed: {exc}", field=FIELD) from None
    return _table_transfer_set(table, features, label, limits)


def _read_csv(path: Path, delimiter: str, columns: list[str], types: dict[str, Any]) -> Any:
    import pyarrow.csv as pacsv

    return pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(
            include_columns=columns, column_types=types, strings_can_be_null=True
        ),
    )


@DATASET_READERS.register("parquet")
def read_parquet(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Numeric feature columns and an optional label column from a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
        names = list(parquet_file.schema_arrow.names)
        rows = parquet_file.metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise DatasetInvalid(f"not a readable Parquet file: {exc}", field=FIELD) from None
    if rows > limits.max_rows:
        raise DatasetInvalid(f"{rows} rows; the limit is {limits.max_rows}", field=FIELD)
    features, label = _select_columns(names, options, limits)
    _check_feature_count(features, limits)
    try:
        table = parquet_file.read(columns=[*features, *([label] if label else [])])
    except (pa.ArrowException, OSError) as exc:
        raise DatasetInvalid(f"the Parquet file cannot be read: {exc}", field=FIELD) from None
    return _table_transfer_set(table, features, label, limits)


def _shown(names: list[str]) -> str:
    """The first few of ``names``, for a message."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown}, … ({len(names)} in all)"


def _check_column_count(columns: int, limits: DataLimits) -> None:
    if columns > limits.max_columns:
        raise DatasetInvalid(
            f"the table has {columns} columns; the limit is {limits.max_columns}", field=FIELD
        )


def _select_columns(
    names: list[str], options: DataSpec, limits: DataLimits
) -> tuple[list[str], str | None]:
    """(feature columns, label column or ``None``) for a table with columns ``names``."""
    _check_column_count(len(names), limits)
    # One pass, and set lookups below: tables may have up to max_columns names.
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DatasetInvalid(f"column names repeat: {_shown(repeated)}", field=FIELD)
    known = set(names)
    label = options.label_column
    if label is not None and label not in known:
        # The default label column may be absent (an unlabelled set); one the spec names may not.
        if "label_column" in options.model_fields_set:
            raise DatasetInvalid(
                f"label column {label!r} is not in the file (columns: {_shown(names)})",
                field="data.label_column",
            )
        label = None
    if options.feature_columns is not None:
        unknown = [repr(column) for column in options.feature_columns if column not in known]
        if unknown:
            raise DatasetInvalid(
                f"feature column(s) {_shown(unknown)} not in the file (columns: {_shown(names)})",
                field="data.feature_columns",
            )
        if label is not None and label in options.feature_columns:
            raise DatasetInvalid(
                f"the label column {label!r} is also listed as a feature",
                field="data.feature_columns",
            )
        features = list(dict.fromkeys(options.feature_columns))
    else:
        features = [name for name in names if name != label]
    if not features:
        raise DatasetInvalid("the file has no feature columns", field=FIELD)
    return features, label


def _check_feature_count(features: list[str], limits: DataLimits) -> None:
    if len(features) > limits.max_features:
        raise DatasetInvalid(
            f"{len(features)} feature columns; the limit is {limits.max_features}", field=FIELD
        )


def _table_transfer_set(
    table: Any, features: list[str], label: str | None, limits: DataLimits
) -> TransferSet:
    """The feature columns of an Arrow ``table`` as float32 ``inputs``, and its labels."""
    rows = table.num_rows
    if rows == 0:
        raise DatasetInvalid("the file has no rows", field=FIELD)
    if rows > limits.max_rows:
        raise DatasetInvalid(f"{rows} rows; the limit is {limits.max_rows}", field=FIELD)
    inputs = np.empty((rows, len(features)), dtype=np.float32)
    for index, name in enumerate(features):
        inputs[:, index] = _feature_values(table.column(name), name)
    labels, class_names = (
        (None, None) if label is None else _label_values(table.column(label), label)
    )
    return TransferSet(
        arrays={"inputs": inputs}, labels=labels, modality="tabular", class_names=class_names
    )


def _feature_values(column: Any, name: str) -> np.ndarray:
    """A numeric column as float32, refusing missing, NaN and infinite cells by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column_type = column.type
    if pa.types.is_decimal(column_type):
        column = pc.cast(column, pa.float64())
    elif not (
        pa.types.is_integer(column_type)
        or pa.types.is_floating(column_type)
        or pa.types.is_boolean(column_type)
    ):
        raise DatasetInvalid(
            f"feature column {name!r} is not numeric ({column_type}); encode it as numbers or "
            "list the numeric columns in data.feature_columns",
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


def _first_null(column: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.index(pc.is_null(column), True).as_py())


def _label_values(column: Any, name: str) -> tuple[np.ndarray | None, list[str] | None]:
    """(labels, class names) from the label column; empty cells are rows without a label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    what = f"label column {name!r}"
    column_type = column.type
    if pa.types.is_null(column_type):
        return None, None  # no cell holds a label
    if pa.types.is_dictionary(column_type):
        column = pc.cast(column, column_type.value_type)
        column_type = column.type
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        class_names = sorted(str(value) for value in pc.unique(column.drop_null()).to_pylist())
        ids = pc.index_in(column, value_set=pa.array(class_names, type=column_type))
        return pc.fill_null(ids, UNLABELLED).to_numpy().astype(np.int64), class_names
    if pa.types.is_integer(column_type) or pa.types.is_boolean(column_type):
        ids = pc.fill_null(pc.cast(column, pa.int64()), UNLABELLED).to_numpy().astype(np.int64)
        check_class_ids(ids, what, first_row=1)
        return ids, None
    if pa.types.is_floating(column_type) or pa.types.is_decimal(column_type):
        targets = np.asarray(
            pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float32
        )
        check_targets(targets, what, first_row=1)
        return targets, None
    raise DatasetInvalid(
        f"{what} has type {column_type}; expected class names, class ids or numbers", field=FIELD
    )


def _csv_header(path: Path, limits: DataLimits) -> tuple[str, list[str]]:
    """(delimiter, column names) from the first lines of a CSV file."""
    lines: list[str] = []
    with open(path, "rb") as file:
        # The header can be long (one name per feature), so read whole lines, not a prefix.
        while len(lines) < _CSV_SAMPLE_LINES and (raw := file.readline(_CSV_HEADER_BYTES + 1)):
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
    try:
        header = next(csv.reader(lines[:1], delimiter=delimiter))
    except csv.Error as exc:
        raise DatasetInvalid(f"the CSV header row cannot be parsed: {exc}", field=FIELD) from None
    _check_column_count(len(header), limits)
    if all(_is_number(name) for name in header):
        raise DatasetInvalid(
            "the CSV's first row is all numbers; a header row naming the columns is required",
            field=FIELD,
        )
    return delimiter, header


def _csv_delimiter(lines: list[str]) -> str:
    """The delimiter that splits every sampled line into the same number (> 1) of fields."""
    best, best_fields = ",", 1
    for delimiter in (",", ";", "\t"):
        try:
            counts = {len(row) for row in csv.reader(lines, delimiter=delimiter)}
        except csv.Error:
            # A wide row read with the wrong delimiter is one field past the csv module's
            # field limit: not this delimiter.
            continue
        if len(counts) == 1 and (fields := counts.pop()) > best_fields:
            best, best_fields = delimiter, fields
    return best


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
