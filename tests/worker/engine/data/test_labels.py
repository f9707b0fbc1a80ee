"""Partial labels: a row without a label in every format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.data.factories import write_jsonl, write_parquet
from tests.worker.engine.factories import write_npz
from worker.engine.data import inspect_dataset, load_transfer_set
from worker.engine.errors import DatasetInvalid


def test_partial_labels_mark_rows_without_a_label(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    import pyarrow as pa

    x, y = digit_arrays
    partial = y.copy()
    partial[::2] = -1
    transfer_set = load_transfer_set(write_npz(tmp_path / "a.npz", x, partial))
    assert transfer_set.labelled_rows == len(y) // 2 and transfer_set.num_classes == 10
    targets = y.astype(np.float32)
    targets[:3] = np.nan
    transfer_set = load_transfer_set(write_npz(tmp_path / "b.npz", x, targets))
    assert transfer_set.label_kind == "value" and transfer_set.labelled_rows == len(y) - 3
    targets[5] = np.inf
    with raises(DatasetInvalid, "'labels'", "infinite", "row 5"):
        load_transfer_set(write_npz(tmp_path / "c.npz", x, targets))
    path = write_parquet(
        tmp_path / "d.parquet",
        {"a": [1.0, 2.0, 3.0], "label": pa.array(["cat", None, "dog"])},
    )
    transfer_set = load_transfer_set(path)
    np.testing.assert_array_equal(transfer_set.labels, [0, -1, 1])
    assert (
        transfer_set.class_names == ["cat", "dog"] and inspect_dataset(path)["labelled_rows"] == 2
    )
    path = tmp_path / "e.csv"
    path.write_text("a,label\n1,0.5\n2,\n")
    transfer_set = load_transfer_set(path)
    assert transfer_set.labels is not None
    assert transfer_set.labels[0] == 0.5 and np.isnan(transfer_set.labels[1])
    path.write_text("a,label\n1,\n2,\n")
    assert load_transfer_set(path).labels is None
    rows = [{"text": "a", "label": "pos"}, {"text": "b"}, {"text": "c", "label": None}]
    transfer_set = load_transfer_set(write_jsonl(tmp_path / "f.jsonl", rows))
    np.testing.assert_array_equal(transfer_set.labels, [0, -1, -1])
    transfer_set = load_transfer_set(
        write_jsonl(tmp_path / "g.jsonl", [{"text": "a"}, {"text": "b", "label": 2}])
    )
    np.testing.assert_array_equal(transfer_set.labels, [-1, 2])
