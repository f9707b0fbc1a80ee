"""Text transfer sets: the ``jsonl`` reader, and :func:`tokenize` for a text teacher.

A text set holds ``texts`` and no arrays until :func:`tokenize` turns the texts
into token ids with the teacher's tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.data.labels import check_class_ids, check_targets
from worker.engine.data.registry import DATASET_READERS, DEFAULT_DATA_LIMITS, DataLimits
from worker.engine.data.transfer_set import FIELD, UNLABELLED, TransferSet
from worker.engine.errors import DatasetInvalid
from worker.engine.spec import DataSpec

Label = int | float | str | None


@DATASET_READERS.register("jsonl")
def read_jsonl(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """Texts and optional labels from JSON Lines: ``{"text": "...", "label": 3 or "name"}``.

    A line without ``label`` (or with ``null``) is a row without a label.
    """
    texts: list[str] = []
    labels: list[Label] = []
    with open(path, "rb") as file:
        line_number = 0
        while raw := file.readline(limits.max_line_bytes + 2):
            line_number += 1
            if len(raw.rstrip(b"\r\n")) > limits.max_line_bytes:
                raise DatasetInvalid(
                    f"line {line_number} is longer than {limits.max_line_bytes} bytes",
                    field=FIELD,
                )
            record = _parse_line(raw, line_number)
            if record is None:
                continue
            text, label = record
            labels.append(label)
            texts.append(text)
            if len(texts) > limits.max_rows:
                raise DatasetInvalid(
                    f"more than {limits.max_rows} rows; that is the limit", field=FIELD
                )
    if not texts:
        raise DatasetInvalid("the JSONL file holds no rows", field=FIELD)
    label_array, class_names = _text_labels(labels)
    return TransferSet(
        arrays={}, labels=label_array, modality="text", texts=texts, class_names=class_names
    )


def _parse_line(raw: bytes, line_number: int) -> tuple[str, Label] | None:
    """(text, label) from one JSONL line; ``None`` for a blank line."""
    try:
        line = raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError:
        raise DatasetInvalid(f"line {line_number} is not UTF-8 text", field=FIELD) from None
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetInvalid(
            f"line {line_number} is not valid JSON: {exc.msg} at column {exc.colno}",
            field=FIELD,
        ) from None
    if not isinstance(record, dict):
        raise DatasetInvalid(f"line {line_number} is not a JSON object", field=FIELD)
    text = record.get("text")
    if text is None:
        raise DatasetInvalid(f'line {line_number} has no "text" field', field=FIELD)
    if not isinstance(text, str):
        raise DatasetInvalid(f'line {line_number}: "text" must be a string', field=FIELD)
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int | float | str)):
        raise DatasetInvalid(
            f'line {line_number}: "label" must be a class name, class id or number',
            field=FIELD,
        )
    return text, label


def _text_labels(labels: list[Label]) -> tuple[np.ndarray | None, list[str] | None]:
    """(labels, class names): names become sorted class ids, numbers ids or targets."""
    kinds = {type(label) for label in labels if label is not None}
    if not kinds:
        return None, None
    if str in kinds:
        if kinds != {str}:
            raise DatasetInvalid(
                '"label" mixes class names and numbers; use one or the other', field=FIELD
            )
        class_names = sorted({label for label in labels if isinstance(label, str)})
        index = {name: class_id for class_id, name in enumerate(class_names)}
        ids = [UNLABELLED if label is None else index[str(label)] for label in labels]
        return np.array(ids, dtype=np.int64), class_names
    if kinds == {int}:
        id_array = np.array(
            [UNLABELLED if label is None else label for label in labels], dtype=np.int64
        )
        check_class_ids(id_array, '"label"', first_row=1)
        return id_array, None
    targets = np.array([np.nan if label is None else label for label in labels], dtype=np.float32)
    check_targets(targets, '"label"', first_row=1)
    return targets, None


def tokenize(
    transfer_set: TransferSet, tokenizer: Any, max_length: int, *, batch_size: int = 4096
) -> TransferSet:
    """A copy of the text set with ``input_ids``/``attention_mask`` (int64, N x L) filled.

    ``tokenizer`` is a Hugging Face tokenizer; texts are padded and truncated to
    ``max_length`` and encoded ``batch_size`` at a time to bound memory.
    ``token_type_ids`` is kept when the tokenizer returns it.
    """
    if transfer_set.texts is None:
        raise DatasetInvalid(
            f"a text teacher needs a text dataset (JSONL); this one is {transfer_set.modality}",
            field=FIELD,
        )
    rows = len(transfer_set.texts)
    arrays: dict[str, np.ndarray] = {}
    for start in range(0, rows, batch_size):
        encoded = tokenizer(
            transfer_set.texts[start : start + batch_size],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        batch = {"input_ids": ids}
        # Without a mask from the tokenizer every position is real (all are padded to one length).
        batch["attention_mask"] = np.asarray(
            encoded["attention_mask"] if "attention_mask" in encoded else np.ones_like(ids),
            dtype=np.int64,
        )
        if "token_type_ids" in encoded:
            batch["token_type_ids"] = np.asarray(encoded["token_type_ids"], dtype=np.int64)
        for key, array in batch.items():
            if key not in arrays:
                arrays[key] = np.empty((rows, array.shape[1]), dtype=np.int64)
            arrays[key][start : start + len(array)] = array
    return replace(transfer_set, arrays=arrays)


def token_lengths(arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Each row's length up to its last attended position, for rows of tokens, else None.

    Rows of tokens are those with a 2-D integer ``attention_mask``. The teacher pass runs
    them in order of length, and the evaluation harness cuts each batch to its longest
    (``evaluation.onnx_files.cut_positions``), so a batch holds rows of like length.
    """
    mask = arrays.get("attention_mask")
    if mask is None or mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        return None
    attended = mask != 0
    last = mask.shape[1] - np.argmax(attended[:, ::-1], axis=1)
    return np.where(attended.any(axis=1), last, 1)
