"""The transfer set: the inputs the teacher labels and the student learns from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

Modality = Literal["tabular", "image", "sequence", "text"]

#: ``field`` of content errors; the message names the array, column, line or member.
FIELD = "dataset"

#: The class id of a row without a label (targets use NaN).
UNLABELLED = -1


@dataclass
class TransferSet:
    """The inputs the teacher labels and the student learns from.

    ``arrays`` maps batch keys (``inputs``; or ``input_ids``/``attention_mask``
    for tokenized text) to arrays whose first axis is the sample. Text sets
    hold ``texts`` and empty ``arrays`` until :func:`tokenize`. Labels may be
    partial: class id ``UNLABELLED`` (-1) or NaN targets mark rows without one.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None  # int64 (N,) class ids, or float32 (N,) / (N, D) targets;
    # a row without a label holds class id -1 (NaN for targets)
    modality: Modality
    texts: list[str] | None = None
    class_names: list[str] | None = None
    digest: str = ""

    def __len__(self) -> int:
        if self.arrays:
            return int(next(iter(self.arrays.values())).shape[0])
        if self.texts is not None:
            return len(self.texts)
        return 0 if self.labels is None else len(self.labels)

    @property
    def label_kind(self) -> Literal["class", "value"] | None:
        """``class`` for integer class ids, ``value`` for regression targets."""
        if self.labels is None:
            return None
        return "class" if np.issubdtype(self.labels.dtype, np.integer) else "value"

    @property
    def num_classes(self) -> int | None:
        """Classes named, else one past the largest class id; ``None`` without class labels."""
        if self.label_kind != "class" or self.labels is None:
            return None
        if self.class_names is not None:
            return len(self.class_names)
        largest = int(self.labels.max()) if len(self.labels) else UNLABELLED
        return None if largest == UNLABELLED else largest + 1

    @property
    def labelled_rows(self) -> int:
        """Rows that carry a label."""
        if self.labels is None:
            return 0
        if self.label_kind == "class":
            return int((self.labels != UNLABELLED).sum())
        return int((~np.isnan(self.labels.reshape(len(self.labels), -1)).any(axis=1)).sum())

    @property
    def feature_shape(self) -> tuple[int, ...] | None:
        """Per-sample shape of ``inputs`` (or ``input_ids``); ``None`` for untokenized text."""
        key = "inputs" if "inputs" in self.arrays else "input_ids"
        if key not in self.arrays:
            return None
        return tuple(int(size) for size in self.arrays[key].shape[1:])

    def subset(self, indices: np.ndarray) -> TransferSet:
        """The rows at ``indices``, in that order (a copy)."""
        rows = np.asarray(indices, dtype=np.int64)
        digest = ""
        if self.digest:
            # A subset must not share its parent's digest, or cached teacher outputs mix up.
            digest = hashlib.sha256(self.digest.encode() + rows.tobytes()).hexdigest()
        return TransferSet(
            arrays={key: array[rows] for key, array in self.arrays.items()},
            labels=None if self.labels is None else self.labels[rows],
            modality=self.modality,
            texts=None if self.texts is None else [self.texts[i] for i in rows.tolist()],
            class_names=self.class_names,
            digest=digest,
        )
