"""Dataset readers by format name, and the caps every reader enforces.

Adding a format is one reader function in one module of this package,
decorated with ``@DATASET_READERS.register(name)``, plus the rule in
:mod:`worker.engine.data.sniffing` that recognises its content. The package's
``__init__`` imports every reader module, so each registers on import.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from worker.engine.archive import ArchiveLimits
from worker.engine.data.transfer_set import TransferSet
from worker.engine.registry import Registry
from worker.engine.spec import DataSpec

#: Dataset archives (``.npz``, image zips). Numbers and encoded images deflate by well
#: under 100x; zeros deflate by ~1000x, so a small upload could otherwise expand a
#: thousandfold. Every member read counts against one budget per dataset.
DATASET_ARCHIVE_LIMITS = ArchiveLimits(
    max_member_bytes=32 << 30,
    max_total_bytes=32 << 30,
    max_ratio=100.0,
)


@dataclass(frozen=True)
class DataLimits:
    """Caps on what a reader accepts, so a hostile file fails early and clearly."""

    max_rows: int = 50_000_000
    max_features: int = 16_000_000  # values per row: the product of the per-sample shape
    max_columns: int = 100_000  # columns of a CSV or Parquet table
    max_line_bytes: int = 1 << 20  # one JSONL line
    max_image_pixels: int = 4096 * 4096  # one image as stored, before resizing
    max_image_bytes: int = 256 << 20  # one encoded image member
    max_array_bytes: int = 64 << 30  # the decoded image array, checked before allocating
    archive: ArchiveLimits = DATASET_ARCHIVE_LIMITS  # reads of every zip member
    #: Any dataset may decode to this much in memory, whatever its size (small images
    #: upscaled to data.image_size); beyond it, to ``archive.max_ratio`` times its file size.
    decoded_floor_bytes: int = 256 << 20

    def decoded_cap(self, file_bytes: int) -> int:
        """The most bytes a dataset file of ``file_bytes`` may decode to in memory."""
        by_ratio = int(self.archive.max_ratio * file_bytes)
        return min(self.max_array_bytes, max(self.decoded_floor_bytes, by_ratio))


DEFAULT_DATA_LIMITS = DataLimits()


class DatasetReader(Protocol):
    """Reads the file at ``path`` into a validated transfer set.

    Raises :class:`DatasetInvalid` naming the array, column, line or member at fault.
    """

    def __call__(
        self, path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
    ) -> TransferSet: ...


DATASET_READERS = Registry[DatasetReader]("dataset format")
