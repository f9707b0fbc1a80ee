"""Splitting a transfer set into training, validation and test sets."""

from __future__ import annotations

import numpy as np

from worker.engine.data.transfer_set import FIELD, TransferSet
from worker.engine.errors import DatasetInvalid


def split(
    transfer_set: TransferSet, validation_split: float, seed: int
) -> tuple[TransferSet, TransferSet]:
    """(train, validation) subsets, deterministic for a given ``seed``.

    The validation set holds ``max(1, round(N * validation_split))`` rows. With
    class labels where every class has at least two rows the split is
    stratified: each class gives its share, and keeps at least one training row.
    """
    rows = len(transfer_set)
    if not 0.0 < validation_split < 1.0:
        raise DatasetInvalid(
            f"validation_split must be between 0 and 1, not {validation_split}",
            field="evaluation.validation_split",
        )
    validation_rows = max(1, round(rows * validation_split))
    if rows - validation_rows < 1:
        raise DatasetInvalid(
            f"{rows} row(s) cannot be split into training and validation sets; "
            "at least 2 are needed",
            field=FIELD,
        )
    order = np.random.default_rng(seed).permutation(rows)
    validation = None
    if transfer_set.label_kind == "class" and transfer_set.labels is not None:
        validation = _stratified(transfer_set.labels, order, validation_rows)
    if validation is None:
        validation = order[:validation_rows]
    in_validation = np.zeros(rows, dtype=bool)
    in_validation[validation] = True
    return (
        transfer_set.subset(np.flatnonzero(~in_validation)),
        transfer_set.subset(np.flatnonzero(in_validation)),
    )


def split_three(
    transfer_set: TransferSet, validation_split: float, test_split: float | None, seed: int
) -> tuple[TransferSet, TransferSet, TransferSet | None]:
    """(train, validation, test) subsets, disjoint and deterministic for a given ``seed``.

    Test rows (``test_split`` of the set) come off first, then validation rows
    (``validation_split`` of the whole set) from the rest, each stratified by class as
    :func:`split` does. With ``test_split`` None there is no test subset (the caller
    brings its own test set).
    """
    if test_split is None:
        train, validation = split(transfer_set, validation_split, seed)
        return train, validation, None
    if not 0.0 < validation_split + test_split < 1.0:
        raise DatasetInvalid(
            "validation_split + test_split must be below 1", field="evaluation.test_split"
        )
    rest, test = split(transfer_set, test_split, seed)
    # The validation share is of the whole set, so rescale it to what is left.
    train, validation = split(rest, min(validation_split / (1.0 - test_split), 0.95), seed)
    return train, validation, test


def _stratified(labels: np.ndarray, order: np.ndarray, validation_rows: int) -> np.ndarray | None:
    """Validation indices taking each class's share; ``None`` if not possible.

    ``order`` is the shuffled row order; each class takes its first rows in it.
    """
    shuffled = labels[order]
    classes, counts = np.unique(shuffled, return_counts=True)
    if counts.min() < 2:
        return None
    exact = counts * validation_rows / len(order)
    quota = np.minimum(np.floor(exact).astype(np.int64), counts - 1)
    # Largest remainders first (ties to the lower class id), never emptying a class's training.
    for class_index in np.argsort(-(exact - quota), kind="stable"):
        if quota.sum() >= validation_rows:
            break
        if quota[class_index] < counts[class_index] - 1:
            quota[class_index] += 1
    if quota.sum() != validation_rows:
        return None
    picks = [
        order[shuffled == class_id][:class_quota]
        for class_id, class_quota in zip(classes, quota, strict=True)
    ]
    return np.concatenate(picks)
