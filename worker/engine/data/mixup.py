"""Rows between training rows, for the teacher to label: ``method.mixup``.

A teacher labels any input, not only the transfer set's rows. Mixing random pairs of
training rows (``lam * a + (1 - lam) * b``, ``lam`` uniform in [0, 1]) gives rows in
between, where a small transfer set says nothing of the teacher's boundaries; the
teacher's outputs on them are targets like any other. ``bench/mixup_students.py`` scores
students of scikit-learn teachers on rows nobody chose, with and without: a forest on
wine and a gradient-boosting regressor matched their teachers more closely with mixed
rows, a forest on breast-cancer rows about as well, and a forest on 8x8 digit images
(rows of 64 pixels, where a mix of two images is no digit) slightly less.

Mixed rows join the training split only: validation and test rows are the transfer
set's own, and the labels-only baseline never sees a mixed row (they carry no label).
"""

from __future__ import annotations

import hashlib

import numpy as np

from worker.engine.data.transfer_set import UNLABELLED, TransferSet
from worker.engine.errors import SpecInvalid

FIELD = "method.mixup"
#: ``method.mixup: "auto"``: mixed rows per training row, for training splits of rows of
#: numbers up to :data:`AUTO_MAX_TRAIN_ROWS` rows (a larger set covers its own space).
AUTO_PER_ROW = 4
AUTO_MAX_TRAIN_ROWS = 10_000
#: Mixed rows never hold more than this many bytes of inputs, whatever the spec asks.
MAX_BYTES = 256 * 2**20


def mixable(train: TransferSet) -> bool:
    """Whether ``train``'s rows can be mixed: a table whose every input is floating point."""
    return (
        train.modality == "tabular"
        and bool(train.arrays)
        and all(np.issubdtype(array.dtype, np.floating) for array in train.arrays.values())
    )


def unmixable(what: str) -> SpecInvalid:
    """The refusal of a number of mixed rows for a transfer set whose rows are ``what``."""
    return SpecInvalid(
        f'mixup mixes rows of numbers; this transfer set is {what}: use 0 or "auto"',
        field=FIELD,
    )


def mixed_row_count(per_row: float | str, train: TransferSet) -> int:
    """How many mixed rows ``method.mixup`` (``per_row``) adds to ``train``.

    ``"auto"``: :data:`AUTO_PER_ROW` a row for a mixable split of up to
    :data:`AUTO_MAX_TRAIN_ROWS` rows, none otherwise. A number asks for that many a row
    and is refused (naming the field) for rows that cannot be mixed: tokens, images,
    integer inputs. Capped at :data:`MAX_BYTES` of inputs either way.
    """
    rows = len(train)
    if per_row == "auto":
        if not mixable(train) or rows > AUTO_MAX_TRAIN_ROWS:
            return 0
        per_row = AUTO_PER_ROW
    per_row = float(per_row)
    if per_row == 0.0 or rows < 2:
        return 0
    if not mixable(train):
        inputs = ", ".join(f"{name} ({array.dtype})" for name, array in train.arrays.items())
        raise unmixable(f"{train.modality} with inputs {inputs}")
    row_bytes = sum(array[0].nbytes for array in train.arrays.values())
    return int(min(round(per_row * rows), MAX_BYTES // max(row_bytes, 1)))


def with_mixed_rows(train: TransferSet, count: int, seed: int) -> TransferSet:
    """``train`` followed by ``count`` rows mixed from random pairs of its rows, unlabelled.

    The same ``train``, ``count`` and ``seed`` give the same rows (and digest), so the
    teacher's outputs on them are cached like any split's.
    """
    if count <= 0:
        return train
    rng = np.random.default_rng([seed, count, len(train)])
    first = rng.integers(0, len(train), count)
    # Never a row with itself: that mix is a copy.
    second = (first + rng.integers(1, len(train), count)) % len(train)
    weight = rng.uniform(0.0, 1.0, count)
    arrays = {}
    for name, array in train.arrays.items():
        lam = weight.reshape((count,) + (1,) * (array.ndim - 1)).astype(array.dtype)
        mixed = lam * array[first] + (1 - lam) * array[second]
        arrays[name] = np.concatenate([array, mixed.astype(array.dtype)])
    labels = train.labels
    if labels is not None:
        missing = UNLABELLED if np.issubdtype(labels.dtype, np.integer) else np.nan
        labels = np.concatenate(
            [labels, np.full((count, *labels.shape[1:]), missing, labels.dtype)]
        )
    digest = ""
    if train.digest:
        digest = hashlib.sha256(f"{train.digest}:mixup:{count}:{seed}".encode()).hexdigest()
    return TransferSet(
        arrays=arrays,
        labels=labels,
        modality=train.modality,
        texts=None,
        class_names=train.class_names,
        digest=digest,
    )
