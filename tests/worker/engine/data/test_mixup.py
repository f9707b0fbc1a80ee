"""Rows mixed from pairs of training rows (``method.mixup``): how many, where, unlabelled."""

from __future__ import annotations

import numpy as np
import pytest

from worker.engine.data.mixup import (
    AUTO_MAX_TRAIN_ROWS,
    AUTO_PER_ROW,
    MAX_BYTES,
    mixed_row_count,
    with_mixed_rows,
)
from worker.engine.data.transfer_set import UNLABELLED, TransferSet
from worker.engine.errors import SpecInvalid


def _table(rows: int, width: int = 3, labels: np.ndarray | None = None) -> TransferSet:
    values = np.random.default_rng(0).normal(size=(rows, width)).astype(np.float32)
    return TransferSet({"inputs": values}, labels, "tabular", digest="d" * 64)


def test_auto_mixes_small_tables_of_numbers_only() -> None:
    assert mixed_row_count("auto", _table(300)) == AUTO_PER_ROW * 300
    assert mixed_row_count("auto", _table(AUTO_MAX_TRAIN_ROWS + 1)) == 0
    tokens = TransferSet({"input_ids": np.ones((50, 8), np.int64)}, None, "text")
    assert mixed_row_count("auto", tokens) == 0
    integers = TransferSet({"inputs": np.ones((50, 4), np.int64)}, None, "tabular")
    assert mixed_row_count("auto", integers) == 0
    assert mixed_row_count(0, _table(300)) == 0
    assert mixed_row_count(2.5, _table(300)) == 750


def test_a_number_for_rows_that_cannot_mix_names_the_field() -> None:
    images = TransferSet({"inputs": np.zeros((10, 3, 8, 8), np.float32)}, None, "image")
    with pytest.raises(SpecInvalid) as info:
        mixed_row_count(2, images)
    assert info.value.field == "method.mixup" and "image" in info.value.message


def test_mixed_rows_are_capped_in_bytes() -> None:
    wide = _table(64, width=4096)  # 16 KiB a row
    assert mixed_row_count(64, wide) == min(64 * 64, MAX_BYTES // (4096 * 4))
    assert mixed_row_count(64, wide) * 4096 * 4 <= MAX_BYTES


@pytest.mark.parametrize(
    "labels",
    [np.array([0, 1] * 50, dtype=np.int64), np.arange(100, dtype=np.float32), None],
    ids=["classes", "targets", "none"],
)
def test_mixed_rows_follow_the_rows_between_pairs_and_carry_no_label(
    labels: np.ndarray | None,
) -> None:
    train = _table(100, labels=labels)
    mixed = with_mixed_rows(train, 400, seed=7)
    assert len(mixed) == 500
    original, extra = mixed.arrays["inputs"][:100], mixed.arrays["inputs"][100:]
    np.testing.assert_array_equal(original, train.arrays["inputs"])
    assert extra.dtype == np.float32
    # Each mixed row lies between two training rows: within the table's range, and not
    # a copy of one (the weights are continuous).
    low, high = original.min(0), original.max(0)
    assert ((extra >= low - 1e-6) & (extra <= high + 1e-6)).all()
    assert not (extra[:, None, :] == original[None]).all(-1).any()
    if labels is None:
        assert mixed.labels is None
    elif labels.dtype == np.int64:
        assert mixed.labels is not None and (mixed.labels[100:] == UNLABELLED).all()
        assert mixed.labelled_rows == 100
    else:
        assert mixed.labels is not None and np.isnan(mixed.labels[100:]).all()
        assert mixed.labelled_rows == 100


def test_the_same_seed_gives_the_same_rows_and_digest() -> None:
    train = _table(100)
    first, again = with_mixed_rows(train, 50, seed=3), with_mixed_rows(train, 50, seed=3)
    np.testing.assert_array_equal(first.arrays["inputs"], again.arrays["inputs"])
    assert first.digest == again.digest != train.digest
    other = with_mixed_rows(train, 50, seed=4)
    assert other.digest != first.digest
    assert not np.array_equal(other.arrays["inputs"], first.arrays["inputs"])
    assert with_mixed_rows(train, 0, seed=3) is train
