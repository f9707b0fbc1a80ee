"""CSV, Parquet and JSONL dataset files (npz and image zips: ``tests.worker.engine.factories``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: Class names of the ten digits.
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_csv(
    path: Path,
    inputs: np.ndarray,
    labels: np.ndarray | None = None,
    delimiter: str = ",",
    label_name: str = "label",
) -> Path:
    """A CSV with a header row: columns ``f0``, ``f1``, ... and, with labels, ``label_name``."""
    header = [f"f{column}" for column in range(inputs.shape[1])] + (
        [label_name] if labels is not None else []
    )
    lines = [delimiter.join(header)]
    for i, row in enumerate(inputs):
        cells = [repr(float(value)) for value in row]
        if labels is not None:
            cells.append(str(labels[i]))
        lines.append(delimiter.join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, columns: dict[str, Any]) -> Path:
    """A Parquet file of ``columns`` (name to values or pyarrow array)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """JSON Lines: each row an object, or a string written as it is (blank or broken lines)."""
    path.write_text(
        "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n"
    )
    return path
