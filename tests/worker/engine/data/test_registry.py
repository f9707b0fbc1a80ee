"""The readers registered by name, and the caps they enforce."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.data.factories import write_jsonl
from tests.worker.engine.factories import write_npz
from worker.engine.data import DATASET_READERS, DataLimits, load_transfer_set
from worker.engine.errors import DatasetInvalid


def test_every_reader_is_registered() -> None:
    assert set(DATASET_READERS.names()) == {
        "npz",
        "safetensors",
        "csv",
        "parquet",
        "jsonl",
        "image_folders",
    }


def test_caps_are_enforced(tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digit_arrays
    with raises(DatasetInvalid, "rows", "limit"):
        load_transfer_set(write_npz(tmp_path / "d.npz", x, y), limits=DataLimits(max_rows=100))
    with raises(DatasetInvalid, "values per row"):
        load_transfer_set(tmp_path / "d.npz", limits=DataLimits(max_features=10))
    with raises(DatasetInvalid, "line 2", "longer than"):
        load_transfer_set(
            write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b" * 200}]),
            limits=DataLimits(max_line_bytes=100),
        )
