"""The npz and safetensors readers: numeric arrays in, validated float32 inputs out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.data.factories import NAMES
from tests.worker.engine.factories import write_npz
from worker.engine.data import load_transfer_set, sniff_dataset
from worker.engine.errors import DatasetInvalid


@pytest.mark.parametrize("with_labels", [True, False])
def test_npz_round_trip(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray], with_labels: bool
) -> None:
    x, y = digit_arrays
    path = write_npz(tmp_path / "d.bin", x, y if with_labels else None)
    assert sniff_dataset(path) == "npz"
    transfer_set = load_transfer_set(path)
    assert transfer_set.modality == "tabular"
    assert transfer_set.arrays["inputs"].dtype == np.float32
    np.testing.assert_array_equal(transfer_set.arrays["inputs"], x)
    assert len(transfer_set) == len(x)
    if with_labels:
        assert transfer_set.labels is not None and transfer_set.labels.dtype == np.int64
        np.testing.assert_array_equal(transfer_set.labels, y)
        assert transfer_set.label_kind == "class" and transfer_set.num_classes == 10
    else:
        assert transfer_set.labels is None and transfer_set.label_kind is None
    assert len(transfer_set.digest) == 64


def test_npz_images_and_sequences(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    nchw = x.reshape(-1, 1, 8, 8)
    transfer_set = load_transfer_set(write_npz(tmp_path / "a.npz", nchw.astype(np.float64), y))
    assert transfer_set.modality == "image" and transfer_set.arrays["inputs"].dtype == np.float32
    np.testing.assert_array_equal(transfer_set.arrays["inputs"], nchw)
    # Channels-last images are recognised by their trailing 1/3/4 axis and made NCHW.
    transfer_set = load_transfer_set(write_npz(tmp_path / "b.npz", nchw.transpose(0, 2, 3, 1), y))
    assert transfer_set.arrays["inputs"].shape == (len(x), 1, 8, 8)
    np.testing.assert_array_equal(transfer_set.arrays["inputs"], nchw)
    assert transfer_set.arrays["inputs"].flags["C_CONTIGUOUS"]
    # Rank 3 is a sequence (N, T, F).
    transfer_set = load_transfer_set(write_npz(tmp_path / "c.npz", x.reshape(-1, 8, 8)))
    assert transfer_set.modality == "sequence" and transfer_set.feature_shape == (8, 8)


def test_npz_float_labels_are_targets_and_class_names_kept(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    transfer_set = load_transfer_set(write_npz(tmp_path / "r.npz", x, y.astype(np.float64) / 2))
    assert transfer_set.labels is not None
    assert (
        transfer_set.label_kind == "value"
        and transfer_set.labels.dtype == np.float32
        and transfer_set.num_classes is None
    )
    path = tmp_path / "n.npz"
    np.savez(path, inputs=x, labels=y, class_names=np.array(NAMES))
    assert load_transfer_set(path).class_names == NAMES


@pytest.mark.parametrize("with_labels", [True, False])
def test_safetensors_round_trip(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray], with_labels: bool
) -> None:
    from safetensors.numpy import save_file

    x, y = digit_arrays
    path = tmp_path / "d.data"
    save_file({"inputs": x, **({"labels": y} if with_labels else {})}, str(path))
    assert sniff_dataset(path) == "safetensors"
    transfer_set = load_transfer_set(path)
    np.testing.assert_array_equal(transfer_set.arrays["inputs"], x)
    if with_labels:
        np.testing.assert_array_equal(transfer_set.labels, y)
    else:
        assert transfer_set.labels is None


def test_npz_without_inputs(tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, features=digit_arrays[0])
    with raises(DatasetInvalid, "'inputs'", "features", field="dataset"):
        load_transfer_set(path)


def test_npz_labels_length_mismatch(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    with raises(DatasetInvalid, "'labels'", str(len(y) - 1), str(len(x))):
        load_transfer_set(write_npz(tmp_path / "d.npz", x, y[:-1]))


def test_npz_object_array_is_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with raises(DatasetInvalid, "'inputs'", "object array", "unpickling"):
        load_transfer_set(path)


def test_npz_non_numeric_and_non_finite(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    with raises(DatasetInvalid, "'inputs'", "numeric"):
        load_transfer_set(write_npz(tmp_path / "s.npz", np.array([["a", "b"]])))
    bad = x.copy()
    bad[5, 3] = np.nan
    with raises(DatasetInvalid, "'inputs'", "NaN", "row 5"):
        load_transfer_set(write_npz(tmp_path / "n.npz", bad))
    with raises(DatasetInvalid, "'labels'", "negative class id -2"):
        load_transfer_set(write_npz(tmp_path / "l.npz", x, y - 2))
    with raises(DatasetInvalid, "no rows"):
        load_transfer_set(write_npz(tmp_path / "e.npz", np.zeros((0, 4), np.float32)))


def test_safetensors_without_inputs(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "d.safetensors"
    save_file({"x": digit_arrays[0]}, str(path))
    with raises(DatasetInvalid, "'inputs'", "x"):
        load_transfer_set(path)
