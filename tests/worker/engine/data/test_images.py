"""The image_folders reader: a zip of PNG/JPEG images, one folder per class."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.worker.engine.data.assertions import raises
from tests.worker.engine.data.factories import NAMES
from tests.worker.engine.factories import write_image_folders_zip
from worker.engine.data import DataLimits, load_transfer_set, sniff_dataset
from worker.engine.errors import DatasetInvalid
from worker.engine.spec import DataSpec


@pytest.mark.parametrize("top", [None, "digits"])
def test_image_folders_round_trip(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray], top: str | None
) -> None:
    x, y = digit_arrays
    keep = np.flatnonzero(y < 3)[:120]
    images, labels = x[keep].reshape(-1, 8, 8), y[keep]
    path = write_image_folders_zip(tmp_path / "d.zip", images, labels, NAMES[:3], top=top)
    with zipfile.ZipFile(path, "a") as zip_file:
        zip_file.writestr("README.txt", "not an image")  # skipped
        zip_file.writestr("__MACOSX/._x.png", "junk")
    assert sniff_dataset(path) == "image_folders"
    transfer_set = load_transfer_set(path)
    assert transfer_set.modality == "image" and transfer_set.arrays["inputs"].shape == (
        len(keep),
        1,
        8,
        8,
    )
    assert transfer_set.class_names == sorted(NAMES[:3])
    # Members are read in path order: grouped by class folder, then by file name.
    expected = sorted(range(len(keep)), key=lambda i: (NAMES[labels[i]], i))
    np.testing.assert_array_equal(
        np.array(transfer_set.class_names)[transfer_set.labels], np.array(NAMES)[labels[expected]]
    )
    np.testing.assert_allclose(transfer_set.arrays["inputs"][:, 0], images[expected], atol=1 / 255)


def test_image_folders_rgb_resize_and_unlabelled(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    rgb = np.stack([x[:20].reshape(-1, 8, 8)] * 3, axis=-1)
    path = write_image_folders_zip(tmp_path / "c.zip", rgb, y[:20] % 2, ["even", "odd"], fmt="JPEG")
    transfer_set = load_transfer_set(path, DataSpec(image_size=16))
    assert transfer_set.arrays["inputs"].shape == (20, 3, 16, 16)
    assert transfer_set.arrays["inputs"].min() >= 0.0 and transfer_set.arrays["inputs"].max() <= 1.0
    assert transfer_set.class_names == ["even", "odd"]
    # Images at the top level, or all in one wrapping folder, make an unlabelled set.
    for top in (None, "images"):
        path = write_image_folders_zip(tmp_path / "u.zip", x[:10].reshape(-1, 8, 8), None, top=top)
        transfer_set = load_transfer_set(path)
        assert transfer_set.labels is None and transfer_set.arrays["inputs"].shape == (10, 1, 8, 8)


def test_zip_without_images_or_with_loose_and_huge_images(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zip_file:
        zip_file.writestr("cats/readme.txt", "no images here")
    with raises(DatasetInvalid, "no PNG or JPEG"):
        load_transfer_set(path)
    path = write_image_folders_zip(
        tmp_path / "m.zip", digit_arrays[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
    )
    with zipfile.ZipFile(path, "a") as zip_file, zipfile.ZipFile(path) as source:
        zip_file.writestr("loose.png", source.read(source.namelist()[0]))
    with raises(DatasetInvalid, "'loose.png'", "outside the class folders"):
        load_transfer_set(path)
    small = tmp_path / "s.zip"
    write_image_folders_zip(small, digit_arrays[0][:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1]))
    with raises(DatasetInvalid, "pixels"):
        load_transfer_set(small, limits=DataLimits(max_image_pixels=63))


def test_image_folders_mixed_depths_and_corrupt_images(tmp_path: Path) -> None:
    from PIL import Image

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    wide = np.full((4, 4), 65535 // 2, dtype=np.uint16)  # 16-bit gray: scaled, not clipped
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zip_file:
        zip_file.writestr("gray/a.png", png(wide))
        zip_file.writestr("red/b.png", png(rgb))
    transfer_set = load_transfer_set(path)
    x = transfer_set.arrays["inputs"]
    assert x.shape == (2, 3, 4, 4) and transfer_set.class_names == ["gray", "red"]
    np.testing.assert_allclose(x[0], 0.5, atol=1e-3)
    np.testing.assert_allclose(x[1, 0], 1.0)
    np.testing.assert_allclose(x[1, 1:], 0.0)

    broken = png(np.arange(4096, dtype=np.uint8).reshape(64, 64))
    with zipfile.ZipFile(path, "w") as zip_file:
        zip_file.writestr("a/ok.png", png(rgb))
        zip_file.writestr("b/cut.png", broken[: len(broken) // 2])
    with raises(DatasetInvalid, "'b/cut.png'", "cannot be decoded"):
        load_transfer_set(path)
