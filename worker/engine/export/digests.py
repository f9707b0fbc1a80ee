"""Content digests of artifact files: the sha256 a config records and a download checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

# Large weights are hashed a megabyte at a time rather than read whole.
_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
