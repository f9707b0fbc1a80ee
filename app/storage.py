"""Where uploaded files and artifacts live: a folder named by ``DISTILL_STORAGE_URL``.

Writes stream into a temporary file beside the store, hashing (sha256) and
counting as they go and refusing to pass a size cap; only :meth:`StorageWriter.commit`
moves the file to its key, atomically. A failed or abandoned write leaves nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Annotated

from fastapi import Depends, Request

from app.errors import PayloadTooLarge

#: Bytes per read when streaming a file out.
READ_CHUNK = 256 * 1024
_INCOMING = ".incoming"


@dataclass(frozen=True)
class StoredObject:
    """A stored file: its key, size and sha256 (hex)."""

    key: str
    size: int
    sha256: str


class StorageWriter:
    """A file being written: ``write`` chunks, then ``commit`` or ``abort``.

    Used as a context manager, it aborts unless committed, so an exception
    anywhere in an upload leaves no file behind.
    """

    def __init__(self, final: Path, key: str, incoming: Path, max_bytes: int) -> None:
        self.key = key
        self.max_bytes = max_bytes
        self.size = 0
        self._final = final
        self._hash = hashlib.sha256()
        # A folder of its own: a format whose file names siblings (ONNX external
        # data) sees nothing else while it is inspected.
        self._folder = Path(tempfile.mkdtemp(dir=incoming, prefix="upload-"))
        self.temp_path = self._folder / "upload"
        self._file = open(self.temp_path, "wb")  # noqa: SIM115 - closed by finish/abort
        self._done = False

    def write(self, data: bytes) -> None:
        """Append ``data``; :class:`PayloadTooLarge` as soon as the total passes the cap."""
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(
                f"the upload is larger than the limit of {self.max_bytes} bytes",
                code="upload_too_large",
            )
        self._hash.update(data)
        self._file.write(data)

    @property
    def sha256(self) -> str:
        """The hex sha256 of what was written so far."""
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and close the temporary file (it can then be read at ``temp_path``)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def commit(self) -> StoredObject:
        """Move the file to its key, atomically, and describe it."""
        self.finish()
        self._final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.temp_path, self._final)
        self._folder.rmdir()
        self._done = True
        return StoredObject(self.key, self.size, self.sha256)

    def abort(self) -> None:
        """Drop the temporary file."""
        if self._done:
            return
        self._done = True
        self._file.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> StorageWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class LocalStorage:
    """Files under a root folder, addressed by relative POSIX keys."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._incoming = self.root / _INCOMING

    def path(self, key: str) -> Path:
        """The file of ``key``; refuses keys that would leave the root."""
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or any(p in ("..", ".", _INCOMING) for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def writer(self, key: str, *, max_bytes: int) -> StorageWriter:
        """A :class:`StorageWriter` for ``key`` capped at ``max_bytes``."""
        final = self.path(key)
        self._incoming.mkdir(parents=True, exist_ok=True)
        return StorageWriter(final, key, self._incoming, max_bytes)

    def put_file(self, key: str, source: Path) -> StoredObject:
        """Copy the file ``source`` to ``key`` (atomically), hashing it on the way."""
        with self.writer(key, max_bytes=2**62) as writer, open(source, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                writer.write(chunk)
            return writer.commit()

    def size(self, key: str) -> int:
        """The stored file's size in bytes."""
        return self.path(key).stat().st_size

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes of ``key`` from ``start`` to ``end`` inclusive (to the end by default)."""
        with open(self.path(key), "rb") as f:
            f.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = f.read(READ_CHUNK if remaining is None else min(READ_CHUNK, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing happens if it is already gone)."""
        self.path(key).unlink(missing_ok=True)

    def files(self) -> list[str]:
        """Every stored key (temporary files excluded); for tests and reconciliation."""
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and _INCOMING not in p.relative_to(self.root).parts
        )

    def check(self) -> None:
        """Raise ``OSError`` unless the store can be written (readiness)."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self._incoming):
            pass


def get_storage(request: Request) -> LocalStorage:
    """The application's storage (built by :func:`app.main.create_app`)."""
    storage: LocalStorage = request.app.state.storage
    return storage


StorageDep = Annotated[LocalStorage, Depends(get_storage)]
