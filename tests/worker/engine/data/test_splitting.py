"""Splitting a transfer set into training and validation sets."""

from __future__ import annotations

import numpy as np

from tests.worker.engine.data.assertions import raises
from worker.engine.data import TransferSet, split
from worker.engine.errors import DatasetInvalid


def test_split_is_deterministic_stratified_disjoint_and_covering(
    digit_arrays: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digit_arrays
    transfer_set = TransferSet(
        arrays={"inputs": x, "row": np.arange(len(x))}, labels=y, modality="tabular"
    )
    train, validation = split(transfer_set, 0.2, seed=7)
    assert len(validation) == round(len(x) * 0.2) and len(train) + len(validation) == len(x)
    train_rows, validation_rows = train.arrays["row"], validation.arrays["row"]
    assert not set(train_rows) & set(validation_rows)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train_rows, validation_rows])), np.arange(len(x))
    )
    np.testing.assert_array_equal(validation.labels, y[validation_rows])
    # Each class gives its share of the validation set, within one row.
    assert validation.labels is not None
    for class_id in range(10):
        share = (y == class_id).sum() * len(validation) / len(x)
        assert abs((validation.labels == class_id).sum() - share) < 1
    train_again, validation_again = split(transfer_set, 0.2, seed=7)
    np.testing.assert_array_equal(validation_again.arrays["row"], validation_rows)
    np.testing.assert_array_equal(train_again.arrays["row"], train_rows)
    _, other = split(transfer_set, 0.2, seed=8)
    assert not np.array_equal(other.arrays["row"], validation_rows)


def test_split_unlabelled_texts_and_tiny_sets() -> None:
    transfer_set = TransferSet(
        arrays={}, labels=None, modality="text", texts=[f"t{i}" for i in range(10)]
    )
    train, validation = split(transfer_set, 0.1, seed=0)
    assert transfer_set.texts is not None
    assert train.texts is not None and validation.texts is not None
    assert (
        len(validation) == 1
        and len(train) == 9
        and set(train.texts) | set(validation.texts) == set(transfer_set.texts)
    )
    # A class with one row cannot be stratified; the split falls back to a plain shuffle.
    transfer_set = TransferSet(
        arrays={"inputs": np.zeros((3, 2), np.float32)},
        labels=np.array([0, 1, 1]),
        modality="tabular",
    )
    train, validation = split(transfer_set, 0.5, seed=0)
    assert len(train) == 1 and len(validation) == 2
    one = TransferSet(
        arrays={"inputs": np.zeros((1, 2), np.float32)}, labels=None, modality="tabular"
    )
    with raises(DatasetInvalid, "at least 2"):
        split(one, 0.1, seed=0)
