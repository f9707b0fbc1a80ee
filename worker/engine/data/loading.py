"""Loading a transfer set: the file's format sniffed, its reader run, its digest taken."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from worker.engine.data.registry import DATASET_READERS, DEFAULT_DATA_LIMITS, DataLimits
from worker.engine.data.sniffing import sniff_dataset
from worker.engine.data.transfer_set import TransferSet
from worker.engine.spec import DataSpec


def load_transfer_set(
    path: str | Path,
    options: DataSpec | None = None,
    *,
    limits: DataLimits = DEFAULT_DATA_LIMITS,
) -> TransferSet:
    """Read the dataset at ``path``, its format recognised from its content."""
    path = Path(path)
    options = options or DataSpec()
    reader = DATASET_READERS.get(sniff_dataset(path))
    transfer_set = reader(path, options, limits)
    transfer_set.digest = dataset_digest(path, options)
    return transfer_set


def dataset_digest(path: str | Path, options: DataSpec) -> str:
    """sha256 of the file's bytes followed by the reader options as canonical JSON."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    digest.update(json.dumps(options.model_dump(mode="json"), sort_keys=True).encode())
    return digest.hexdigest()
