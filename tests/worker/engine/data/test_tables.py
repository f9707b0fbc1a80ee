"""The CSV and Parquet readers: feature columns and an optional label column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.data.factories import NAMES, write_csv, write_parquet
from worker.engine.data import load_transfer_set, sniff_dataset
from worker.engine.errors import DatasetInvalid
from worker.engine.spec import DataSpec


def test_csv_with_header_and_label_column(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    path = write_csv(tmp_path / "d.csv", x, y)
    assert sniff_dataset(path) == "csv"
    transfer_set = load_transfer_set(path)
    assert transfer_set.modality == "tabular" and transfer_set.arrays["inputs"].shape == x.shape
    np.testing.assert_allclose(transfer_set.arrays["inputs"], x)
    np.testing.assert_array_equal(transfer_set.labels, y)
    assert transfer_set.class_names is None


def test_csv_string_labels_and_semicolons(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    names = np.array(NAMES)[y]
    transfer_set = load_transfer_set(write_csv(tmp_path / "d.txt", x, names, delimiter=";"))
    assert transfer_set.class_names == sorted(NAMES)
    np.testing.assert_array_equal(np.array(transfer_set.class_names)[transfer_set.labels], names)
    np.testing.assert_allclose(transfer_set.arrays["inputs"], x)


def test_csv_without_labels_float_targets_and_chosen_columns(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    transfer_set = load_transfer_set(write_csv(tmp_path / "a.csv", x[:50]))
    assert transfer_set.labels is None and transfer_set.arrays["inputs"].shape == (50, 64)
    transfer_set = load_transfer_set(
        write_csv(tmp_path / "b.csv", x[:50], y[:50] + 0.5, delimiter="\t")
    )
    assert transfer_set.labels is not None
    assert transfer_set.label_kind == "value" and transfer_set.labels.dtype == np.float32
    spec = DataSpec(feature_columns=["f3", "f1"], label_column="target")
    transfer_set = load_transfer_set(
        write_csv(tmp_path / "c.csv", x[:50], y[:50], label_name="target"), spec
    )
    np.testing.assert_allclose(transfer_set.arrays["inputs"], x[:50, [3, 1]])
    np.testing.assert_array_equal(transfer_set.labels, y[:50])


@pytest.mark.parametrize("with_labels", [True, False])
def test_parquet_round_trip(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray], with_labels: bool
) -> None:
    import pyarrow as pa

    x, y = digit_arrays
    columns = {f"f{j}": x[:, j] for j in range(x.shape[1])}
    if with_labels:
        # Categorical (dictionary-encoded) strings, as pandas writes them.
        columns["label"] = pa.array(np.array(NAMES)[y]).dictionary_encode()
    path = write_parquet(tmp_path / "d.bin", columns)
    assert sniff_dataset(path) == "parquet"
    transfer_set = load_transfer_set(path)
    np.testing.assert_array_equal(transfer_set.arrays["inputs"], x)
    if with_labels:
        assert transfer_set.class_names == sorted(NAMES)
        np.testing.assert_array_equal(
            np.array(transfer_set.class_names)[transfer_set.labels], np.array(NAMES)[y]
        )
    else:
        assert transfer_set.labels is None


def test_csv_text_feature_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,name,label\n1.0,alice,0\n2.0,bob,1\n")
    with raises(DatasetInvalid, "'name'", "not numeric"):
        load_transfer_set(path)
    # Leaving it out by listing the feature columns works.
    transfer_set = load_transfer_set(path, DataSpec(feature_columns=["a"]))
    np.testing.assert_array_equal(transfer_set.arrays["inputs"], [[1.0], [2.0]])


def test_csv_missing_value_names_column_and_row(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,4,1\n5,,0\n")
    with raises(DatasetInvalid, "'b'", "missing", "row 3"):
        load_transfer_set(path)
    # A missing label is a row without a label, not an error.
    path.write_text("a,b,label\n1,2,0\n3,4,\n")
    np.testing.assert_array_equal(load_transfer_set(path).labels, [0, -1])


def test_unknown_columns_name_the_spec_field(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    path = write_csv(tmp_path / "d.csv", digit_arrays[0][:10], digit_arrays[1][:10])
    with raises(DatasetInvalid, "'nope'", field="data.feature_columns"):
        load_transfer_set(path, DataSpec(feature_columns=["f0", "nope"]))
    with raises(DatasetInvalid, "'target'", field="data.label_column"):
        load_transfer_set(path, DataSpec(label_column="target"))
    with raises(DatasetInvalid, "'label'", field="data.feature_columns"):
        load_transfer_set(path, DataSpec(feature_columns=["f0", "label"]))
    parquet = write_parquet(tmp_path / "d.parquet", {"a": [1.0, 2.0]})
    with raises(DatasetInvalid, "'b'", field="data.feature_columns"):
        load_transfer_set(parquet, DataSpec(feature_columns=["b"]))


def test_csv_without_header_or_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with raises(DatasetInvalid, "header"):
        load_transfer_set(path)
    path.write_text("a,b,label\n")
    with raises(DatasetInvalid, "no rows"):
        load_transfer_set(path)
