"""The summary of a dataset that the API shows for an upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.engine.data.registry import DATASET_READERS, DEFAULT_DATA_LIMITS, DataLimits
from worker.engine.data.sniffing import sniff_dataset
from worker.engine.spec import DataSpec


def inspect_dataset(
    path: str | Path,
    options: DataSpec | None = None,
    *,
    limits: DataLimits = DEFAULT_DATA_LIMITS,
) -> dict[str, Any]:
    """A summary of the dataset at ``path`` for the API; reads the data, imports no torch.

    Keys: format, rows, modality, feature_shape (per sample; ``None`` for text),
    has_labels, labelled_rows, label_kind (``class``/``value``/``None``),
    num_classes, class_names, bytes.
    """
    path = Path(path)
    format_name = sniff_dataset(path)
    transfer_set = DATASET_READERS.get(format_name)(path, options or DataSpec(), limits)
    shape = transfer_set.feature_shape
    return {
        "format": format_name,
        "rows": len(transfer_set),
        "modality": transfer_set.modality,
        "feature_shape": None if shape is None else list(shape),
        "has_labels": transfer_set.labelled_rows > 0,
        "labelled_rows": transfer_set.labelled_rows,
        "label_kind": transfer_set.label_kind,
        "num_classes": transfer_set.num_classes,
        "class_names": transfer_set.class_names,
        "bytes": path.stat().st_size,
    }
