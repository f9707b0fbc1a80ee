"""Safe reading of zip bundles (teachers with external data, HF folders, image sets).

Every member path must stay inside the destination; links, absolute paths and
``..`` are refused; member count, each member's size and the total expanded
size are capped, and the caps are enforced on the bytes actually written, not
on what the zip's headers claim.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from worker.engine.errors import ArchiveUnsafe

ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 200_000
    max_member_bytes: int = 64 * 2**30
    max_total_bytes: int = 128 * 2**30
    max_ratio: float = 1000.0


DEFAULT_LIMITS = ArchiveLimits()


def is_zip(path: str | Path) -> bool:
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


def list_members(path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> list[zipfile.ZipInfo]:
    """Validated file members (directories left out)."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArchiveUnsafe(f"not a readable zip archive: {exc}") from None
    with zf:
        infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveUnsafe(f"archive has {len(infos)} members; the limit is {limits.max_members}")
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
        if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
            raise ArchiveUnsafe(
                f"archive member {info.filename!r} has a suspicious compression ratio"
            )
        total += info.file_size
        files.append(info)
    if total > limits.max_total_bytes:
        raise ArchiveUnsafe(
            f"archive expands to {total} bytes; the limit is {limits.max_total_bytes}"
        )
    return files


def extract(path: str | Path, dest: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> Path:
    """Extract the zip at ``path`` into ``dest`` (created), safely; returns ``dest``.

    Sizes are counted while copying, so a member whose header lies about its
    size is still stopped at the cap.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    infos = list_members(path, limits)
    written = 0
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            target = contained(dest, str(member_path(info.filename)))
            target.parent.mkdir(parents=True, exist_ok=True)
            member_written = 0
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    member_written += len(chunk)
                    written += len(chunk)
                    if member_written > limits.max_member_bytes or written > limits.max_total_bytes:
                        out.close()
                        shutil.rmtree(dest, ignore_errors=True)
                        raise ArchiveUnsafe("archive expands past the size limit")
                    out.write(chunk)
    return dest


def bundle_root(dest: Path) -> Path:
    """The folder that holds the bundle's files: ``dest``, or its single top folder."""
    entries = [p for p in dest.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest
