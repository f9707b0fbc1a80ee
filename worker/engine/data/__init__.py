"""Transfer sets: a dataset file read into arrays the engine can batch.

The format is recognised from the file's content (magic bytes and structure),
never from its name (:mod:`.sniffing`), and one reader per format is
registered by name in :data:`DATASET_READERS` (:mod:`.registry`). Every reader
validates what it reads and raises :class:`DatasetInvalid` naming the array,
column, line or member at fault.

Formats, one module each:

* ``npz``: a zip of ``.npy`` members (``numpy.savez``); arrays ``inputs`` and
  optional ``labels`` (and optional string ``class_names``). Never unpickled.
* ``safetensors``: tensors ``inputs`` and optional ``labels``. (Both: :mod:`.arrays`.)
* ``csv`` / ``parquet``: numeric feature columns and an optional label column
  (:mod:`.tables`).
* ``jsonl``: one object per line with ``text`` and optional ``label`` (:mod:`.text`).
* ``image_folders``: a zip with one folder of PNG/JPEG images per class (:mod:`.images`).

Labels are optional, wholly or row by row: a row without one holds class id
:data:`UNLABELLED` (-1), or NaN for regression targets.

No module of this package imports torch: the API calls :func:`inspect_dataset`.
"""

from __future__ import annotations

# Importing the reader modules registers their readers.
from worker.engine.data import arrays, images, tables, text  # noqa: F401
from worker.engine.data.loading import dataset_digest, load_transfer_set
from worker.engine.data.registry import (
    DATASET_READERS,
    DEFAULT_DATA_LIMITS,
    DataLimits,
    DatasetReader,
)
from worker.engine.data.sniffing import FORMAT_NAMES, sniff_dataset
from worker.engine.data.splitting import split
from worker.engine.data.summary import inspect_dataset
from worker.engine.data.text import tokenize
from worker.engine.data.transfer_set import FIELD, UNLABELLED, Modality, TransferSet

__all__ = [
    "DATASET_READERS",
    "DEFAULT_DATA_LIMITS",
    "FIELD",
    "FORMAT_NAMES",
    "UNLABELLED",
    "DataLimits",
    "DatasetReader",
    "Modality",
    "TransferSet",
    "dataset_digest",
    "inspect_dataset",
    "load_transfer_set",
    "sniff_dataset",
    "split",
    "tokenize",
]
