"""Recognising a dataset's format from its content (magic bytes and structure), never its name."""

from __future__ import annotations

import zipfile
from pathlib import Path

from worker.engine import archive
from worker.engine.data.transfer_set import FIELD
from worker.engine.errors import DatasetInvalid, UnsupportedFormat

#: Every format the sniffer recognises, as the refusal of an unrecognised file lists them.
FORMAT_NAMES = {
    "npz": "NumPy .npz (arrays 'inputs', 'labels')",
    "safetensors": "safetensors (tensors 'inputs', 'labels')",
    "csv": "CSV with a header row",
    "parquet": "Parquet",
    "jsonl": "JSON Lines ('text', 'label')",
    "image_folders": "zip of image folders (one per class)",
}

_NPY_MAGIC = b"\x93NUMPY"
_SNIFF_BYTES = 4096


def sniff_dataset(path: str | Path) -> str:
    """The format name of the dataset at ``path``, from its content.

    Raises :class:`UnsupportedFormat` for pickled or unrecognised files,
    :class:`DatasetInvalid` for empty ones, and
    :class:`ArchiveUnsafe` for unsafe zips.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetInvalid(f"dataset file {path.name!r} does not exist", field=FIELD)
    size = path.stat().st_size
    if size == 0:
        raise DatasetInvalid("the dataset file is empty", field=FIELD)
    with open(path, "rb") as file:
        head = file.read(_SNIFF_BYTES)
    if head.startswith((archive.ZIP_MAGIC, b"PK\x05\x06")):
        return _sniff_zip(path)
    if head.startswith(b"PAR1"):
        return "parquet"
    if len(head) > 8 and head[8:9] == b"{":
        header_length = int.from_bytes(head[:8], "little")
        if 2 <= header_length <= size - 8:
            return "safetensors"
    if head.startswith(_NPY_MAGIC):
        raise DatasetInvalid(
            "a single .npy array is not a dataset; save with "
            "numpy.savez(path, inputs=..., labels=...)",
            field=FIELD,
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise UnsupportedFormat(
            "pickle files are refused: unpickling can run arbitrary code. Save the arrays "
            "with numpy.savez(path, inputs=..., labels=...) or as safetensors, CSV or Parquet",
            field=FIELD,
        )
    return _sniff_text(head, complete=size <= _SNIFF_BYTES)


def _sniff_zip(path: Path) -> str:
    members = archive.list_members(path)
    if not members:
        raise DatasetInvalid("the zip archive holds no files", field=FIELD)
    if all(member.filename.endswith(".npy") for member in members):
        with zipfile.ZipFile(path) as zip_file, zip_file.open(members[0]) as file:
            if file.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                return "npz"
    return "image_folders"


def _sniff_text(head: bytes, complete: bool) -> str:
    """``jsonl`` or ``csv`` for a file starting with ``head``, if it is text at all."""
    text = _as_text(head, complete)
    if text is None:
        raise _unrecognised()
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise DatasetInvalid("the dataset file holds only whitespace", field=FIELD)
    return "jsonl" if stripped.startswith("{") else "csv"


def _as_text(head: bytes, complete: bool) -> str | None:
    """``head`` decoded as UTF-8 if it looks like text, else ``None``."""
    if b"\x00" in head:
        return None
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The sniffed prefix may cut a multi-byte character in two at its end.
        if not complete and exc.start >= len(head) - 3:
            return head[: exc.start].decode("utf-8", errors="strict")
        return None


def _unrecognised() -> UnsupportedFormat:
    expected = "; ".join(FORMAT_NAMES.values())
    return UnsupportedFormat(
        f"unrecognised dataset format; expected one of: {expected}", field=FIELD
    )
