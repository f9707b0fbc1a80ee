"""Recognising a dataset's format from its content, and refusing what is unsafe."""

from __future__ import annotations

import io
import pickle
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.factories import write_image_folders_zip
from worker.engine.data import load_transfer_set
from worker.engine.errors import ArchiveUnsafe, DatasetInvalid, UnsupportedFormat


@pytest.mark.parametrize("content", [b"", b"  \n\n"])
def test_empty_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d"
    path.write_bytes(content)
    with raises(DatasetInvalid, "empty" if not content else "whitespace"):
        load_transfer_set(path)
    empty_zip = tmp_path / "e.zip"
    zipfile.ZipFile(empty_zip, "w").close()
    with raises(DatasetInvalid, "no files"):
        load_transfer_set(empty_zip)


def test_pickle_and_random_bytes_are_refused(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps({"inputs": digit_arrays[0][:5]}))
    with raises(UnsupportedFormat, "pickle", "refused"):
        load_transfer_set(path)
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with raises(UnsupportedFormat, "unrecognised dataset format", "expected one of"):
        load_transfer_set(path)
    buffer = io.BytesIO()
    np.save(buffer, digit_arrays[0])
    path.write_bytes(buffer.getvalue())
    with raises(DatasetInvalid, ".npy", "numpy.savez"):
        load_transfer_set(path)


def test_zip_with_escaping_member_is_unsafe(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    path = write_image_folders_zip(
        tmp_path / "d.zip", digit_arrays[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
    )
    with zipfile.ZipFile(path, "a") as zip_file:
        zip_file.writestr("../evil.png", b"x")
    with raises(ArchiveUnsafe, "../evil.png"):
        load_transfer_set(path)


def test_zip_with_symlink_member_is_unsafe(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    path = write_image_folders_zip(
        tmp_path / "d.zip", digit_arrays[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
    )
    link = zipfile.ZipInfo("0/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "a") as zip_file:
        zip_file.writestr(link, "/etc/passwd")
    with raises(ArchiveUnsafe, "symbolic link"):
        load_transfer_set(path)
