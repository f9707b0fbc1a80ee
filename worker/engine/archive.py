"""Safe reading of zip bundles (teachers with external data, HF folders, image sets).

Every member path must stay inside the destination; links, absolute paths and
``..`` are refused. Member count, each member's size, the total expanded size
and the compression ratio are capped: first on what the zip's headers claim,
then on the bytes actually read, so a member whose header lies is still
stopped. Every read of a member, for parsing or for extraction, goes through
:func:`open_member`, which counts against one :class:`ExpansionBudget` per archive.
"""

from __future__ import annotations

import io
import lzma
import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from worker.engine.errors import ArchiveUnsafe

ZIP_MAGIC = b"PK\x03\x04"

#: The service's default upload cap (``DISTILL_MAX_UPLOAD_BYTES``); the engine reads no
#: service settings, so teacher archives are budgeted against this default.
UPLOAD_CAP_BYTES = 10 * 2**30


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on one archive.

    A member may expand to at most ``max_ratio`` times its compressed size, and the
    archive to ``max_ratio`` times its own size; members and archives under
    ``ratio_floor_bytes`` expanded are exempt (small files are harmless at any ratio).
    """

    max_members: int = 200_000
    max_member_bytes: int = 64 * 2**30
    max_total_bytes: int = 128 * 2**30
    max_ratio: float = 1000.0
    ratio_floor_bytes: int = 4 * 2**20


DEFAULT_LIMITS = ArchiveLimits()

#: Teacher bundles. Weights (float or int8) and ONNX graphs deflate by less than 2x,
#: configs, vocabularies and tokenizers by less than 20x; 100x leaves room for odd files
#: while a small upload can no longer expand a thousandfold (deflate reaches ~1030x on
#: zeros). Together they may expand to twice the upload cap.
TEACHER_LIMITS = ArchiveLimits(
    max_member_bytes=2 * UPLOAD_CAP_BYTES,
    max_total_bytes=2 * UPLOAD_CAP_BYTES,
    max_ratio=100.0,
)


#: What a corrupt or unsupported member raises inside zipfile and its decompressors.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
)
# Decompressed per read, so the caps are checked at least this often.
_CHUNK_BYTES = 1 << 20


def is_zip(path: str | Path) -> bool:
    """Whether the file at ``path`` starts like a zip archive."""
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


def member_path(name: str) -> PurePosixPath:
    """The member's relative path, or :class:`ArchiveUnsafe` if it would escape."""
    if "\\" in name or "\x00" in name:
        raise ArchiveUnsafe(f"archive member {name!r} has a forbidden character")
    p = PurePosixPath(name)
    if p.is_absolute() or (p.parts and p.parts[0].endswith(":")):
        raise ArchiveUnsafe(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in p.parts):
        raise ArchiveUnsafe(f"archive member {name!r} escapes the archive")
    return p


def contained(root: Path, relative: str) -> Path:
    """``root / relative`` resolved, refusing anything that lands outside ``root``."""
    root = root.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise ArchiveUnsafe(f"path {relative!r} escapes {root.name}")
    return target


class ExpansionBudget:
    """What one archive may still expand to, shared by every read of its members.

    Bytes are counted as they are read, so reading a member twice costs twice.
    """

    def __init__(self, path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.archive_bytes = Path(path).stat().st_size
        self.left = self._expansion_cap(self.archive_bytes, limits.max_total_bytes)

    def _expansion_cap(self, packed: int, ceiling: int) -> int:
        # A header may claim any compressed size; no member has more than the archive.
        ratio_cap = int(self.limits.max_ratio * min(packed, self.archive_bytes))
        return min(ceiling, max(self.limits.ratio_floor_bytes, ratio_cap))

    def member_cap(self, info: zipfile.ZipInfo) -> int:
        """The most bytes ``info`` may expand to."""
        return self._expansion_cap(info.compress_size, self.limits.max_member_bytes)

    def spend(self, n: int) -> None:
        """Count ``n`` more bytes read; :class:`ArchiveUnsafe` once the budget is spent."""
        self.left -= n
        if self.left < 0:
            raise ArchiveUnsafe(
                "archive expands past its budget "
                f"(at most {self.limits.max_ratio:g} times its size of {self.archive_bytes} "
                f"bytes, and {self.limits.max_total_bytes} bytes in all)"
            )


def list_members(path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> list[zipfile.ZipInfo]:
    """Validated file members (directories left out), checked on what the headers claim."""
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as exc:
        raise ArchiveUnsafe(f"not a readable zip archive: {exc}") from None
    with zf:
        infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveUnsafe(f"archive has {len(infos)} members; the limit is {limits.max_members}")
    budget = ExpansionBudget(path, limits)
    total = 0
    files = []
    for info in infos:
        member_path(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise ArchiveUnsafe(f"archive member {info.filename!r} is a symbolic link")
        if info.is_dir():
            continue
        if info.file_size > limits.max_member_bytes:
            raise ArchiveUnsafe(f"archive member {info.filename!r} is over the size limit")
        if info.file_size > budget.member_cap(info):
            raise ArchiveUnsafe(
                f"archive member {info.filename!r} has a suspicious compression ratio "
                f"({info.file_size} bytes from {info.compress_size})"
            )
        total += info.file_size
        files.append(info)
    if total > budget.left:
        raise ArchiveUnsafe(f"archive expands to {total} bytes; the limit is {budget.left}")
    return files


class _MeteredMember(io.RawIOBase):
    """A member's decompressed bytes, counted against its cap and the archive's budget."""

    def __init__(
        self,
        zf: zipfile.ZipFile,
        info: zipfile.ZipInfo,
        budget: ExpansionBudget,
        owns_archive: bool = True,
    ) -> None:
        self._zf = zf
        self._owns_archive = owns_archive
        self._info = info
        self._budget = budget
        self._cap = budget.member_cap(info)
        self._read = 0
        try:
            self._member = zf.open(info)
        except _READ_ERRORS as exc:
            raise ArchiveUnsafe(f"archive member {info.filename!r} cannot be read: {exc}") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        name = self._info.filename
        try:
            data = self._member.read(min(len(buffer), _CHUNK_BYTES))
        except _READ_ERRORS as exc:
            raise ArchiveUnsafe(f"archive member {name!r} is corrupt: {exc}") from None
        self._read += len(data)
        if self._read > self._cap:
            raise ArchiveUnsafe(
                f"archive member {name!r} expands past {self._cap} bytes "
                f"(from {self._info.compress_size} compressed)"
            )
        self._budget.spend(len(data))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if hasattr(self, "_member"):
            self._member.close()
        if self._owns_archive:
            self._zf.close()
        super().close()


def open_member(path: str | Path, info: zipfile.ZipInfo, budget: ExpansionBudget) -> IO[bytes]:
    """A binary stream of member ``info`` of the zip at ``path``, read under ``budget``.

    Reading raises :class:`ArchiveUnsafe` once the member expands past its cap
    (:meth:`ExpansionBudget.member_cap`) or the archive past its budget, and for
    corrupt data. Closing the stream closes the archive.
    """
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as exc:
        raise ArchiveUnsafe(f"not a readable zip archive: {exc}") from None
    try:
        return io.BufferedReader(_MeteredMember(zf, info, budget))
    except BaseException:
        zf.close()
        raise


class ArchiveReader:
    """One open archive whose members are read, one after another, under one budget.

    For archives of many members (image folders): :func:`open_member` would read
    the central directory again for each one.
    """

    def __init__(self, path: str | Path, budget: ExpansionBudget) -> None:
        try:
            self._zf = zipfile.ZipFile(path)
        except _READ_ERRORS as exc:
            raise ArchiveUnsafe(f"not a readable zip archive: {exc}") from None
        self.budget = budget

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *_: object) -> None:
        self._zf.close()

    def open(self, info: zipfile.ZipInfo) -> IO[bytes]:
        """A binary stream of member ``info``, read under the reader's budget."""
        return io.BufferedReader(_MeteredMember(self._zf, info, self.budget, owns_archive=False))


def extract_members(
    path: str | Path,
    dest: str | Path,
    names: Iterable[str],
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> Path:
    """Extract only the members ``names`` (full names in the zip) into ``dest`` (created).

    Returns ``dest``. Every name must be a file member of the archive, and every
    target stays inside ``dest``; sizes are counted while copying. On any refusal
    ``dest`` is removed.
    """
    members = {info.filename: info for info in list_members(path, limits)}
    budget = ExpansionBudget(path, limits)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for name in dict.fromkeys(names):
            if name not in members:
                raise ArchiveUnsafe(f"the archive has no file member {name!r}")
            target = contained(dest, str(member_path(name)))
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member(path, members[name], budget) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def extract(path: str | Path, dest: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> Path:
    """Extract every member of the zip at ``path`` into ``dest`` (created); returns ``dest``.

    Sizes are counted while copying, so a member whose header lies about its
    size is still stopped at the cap.
    """
    names = [info.filename for info in list_members(path, limits)]
    return extract_members(path, dest, names, limits)


def bundle_root(dest: Path) -> Path:
    """The folder that holds the bundle's files: ``dest``, or its single top folder."""
    entries = [p for p in dest.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest
