"""Wide tables: linear column checks, a column cap, CSV rows past csv's field limit."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.data.factories import write_parquet
from worker.engine.data import load_transfer_set
from worker.engine.data.registry import DEFAULT_DATA_LIMITS, DataLimits
from worker.engine.errors import DatasetInvalid


def write_wide_csv(path: Path, names: list[str], rows: int = 2) -> Path:
    """A CSV with a header of ``names`` and ``rows`` rows of long decimal values."""
    row = ",".join(f"0.{column:09d}" for column in range(len(names)))
    path.write_text(",".join(names) + "\n" + "\n".join([row] * rows) + "\n")
    return path


def feature_names(count: int) -> list[str]:
    return [f"feature_{column:06d}" for column in range(count)]


def test_repeated_names_among_60k_columns_are_found_in_linear_time(tmp_path: Path) -> None:
    names = feature_names(60_000)
    path = write_wide_csv(tmp_path / "d.csv", [*names, names[0]], rows=1)
    started = time.perf_counter()
    with raises(DatasetInvalid, "column names repeat: feature_000000"):
        load_transfer_set(path)
    # The check was quadratic: 36 s for these 60k names.
    assert time.perf_counter() - started < 3.0


def test_60k_numeric_columns_are_read_in_bounded_time(tmp_path: Path) -> None:
    path = write_wide_csv(tmp_path / "d.csv", feature_names(60_000))
    started = time.perf_counter()
    transfer_set = load_transfer_set(path)
    elapsed = time.perf_counter() - started
    assert transfer_set.arrays["inputs"].shape == (2, 60_000)
    assert transfer_set.arrays["inputs"][0, 59_999] == np.float32(0.000059999)
    assert elapsed < 20.0, elapsed


def test_columns_past_the_cap_are_refused_before_the_data_is_read(tmp_path: Path) -> None:
    cap = DEFAULT_DATA_LIMITS.max_columns
    path = write_wide_csv(tmp_path / "d.csv", feature_names(cap + 1), rows=1)
    started = time.perf_counter()
    with raises(DatasetInvalid, f"{cap + 1} columns", f"the limit is {cap}", field="dataset"):
        load_transfer_set(path)
    assert time.perf_counter() - started < 3.0


def test_parquet_columns_past_the_cap_are_refused(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {f"c{i}": [1.0] for i in range(11)})
    with raises(DatasetInvalid, "11 columns", "the limit is 10"):
        load_transfer_set(path, limits=DataLimits(max_columns=10))


def test_a_12k_column_csv_is_read_whatever_its_delimiter(tmp_path: Path) -> None:
    # Each row is past the csv module's 128 KiB field limit when split on a wrong delimiter.
    names = feature_names(12_000)
    for delimiter in (",", ";", "\t"):
        path = write_wide_csv(tmp_path / "d.csv", names)
        path.write_text(path.read_text().replace(",", delimiter))
        started = time.perf_counter()
        transfer_set = load_transfer_set(path)
        assert time.perf_counter() - started < 10.0
        assert transfer_set.arrays["inputs"].shape == (2, 12_000), delimiter
