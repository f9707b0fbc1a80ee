"""Checks on labels shared by every reader: class ids and regression targets."""

from __future__ import annotations

import numpy as np

from worker.engine.data.transfer_set import FIELD, UNLABELLED
from worker.engine.errors import DatasetInvalid


def check_class_ids(ids: np.ndarray, what: str, first_row: int) -> None:
    """Refuse a negative class id other than :data:`UNLABELLED`, naming its row.

    ``what`` names the source in the message; ``first_row`` is the number of row 0
    as the user counts (1 for files with numbered lines or rows).
    """
    if len(ids) and ids.min() < UNLABELLED:
        row = int(np.argmin(ids))
        raise DatasetInvalid(
            f"{what} has a negative class id {int(ids[row])} in row {row + first_row} "
            f"(only {UNLABELLED} is allowed: it marks a row without a label)",
            field=FIELD,
        )


def check_targets(targets: np.ndarray, what: str, first_row: int) -> None:
    """Refuse infinite regression targets; NaN marks a row without a label."""
    infinite = np.isinf(targets.reshape(len(targets), -1)).any(axis=1)
    if infinite.any():
        row = int(np.argmax(infinite)) + first_row
        raise DatasetInvalid(f"{what} has an infinite value in row {row}", field=FIELD)
