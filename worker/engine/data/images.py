"""The ``image_folders`` reader: a zip of PNG/JPEG images, one folder per class."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from worker.engine import archive
from worker.engine.data.registry import DATASET_READERS, DEFAULT_DATA_LIMITS, DataLimits
from worker.engine.data.transfer_set import FIELD, TransferSet
from worker.engine.errors import DatasetInvalid
from worker.engine.spec import DataSpec

_IMAGE_FORMATS = ("PNG", "JPEG")
_WIDE_GRAY_MODES = {"I", "I;16", "I;16B", "I;16L"}  # 16-bit PNGs
_GRAY_MODES = {"1", "L", "LA", *_WIDE_GRAY_MODES}

ImageMember = tuple[zipfile.ZipInfo, PurePosixPath]


@DATASET_READERS.register("image_folders")
def read_image_folders(
    path: Path, options: DataSpec, limits: DataLimits = DEFAULT_DATA_LIMITS
) -> TransferSet:
    """PNG/JPEG images from a zip with one folder per class (optionally under one top folder).

    Images become float32 NCHW in [0, 1], resized to ``options.image_size``
    (square) or else to the most common size; 1 channel if every image is
    grayscale, else RGB. Images all at the top level (or in one folder) make an
    unlabelled set.
    """
    members = _image_members(archive.list_members(path, limits.archive))
    budget = archive.ExpansionBudget(path, limits.archive)
    with archive.ArchiveReader(path, budget) as zip_file:
        found, sizes, gray = _scan_images(zip_file, members, limits)
        paths, in_folders = _class_paths([member_path for _, member_path in found])
        width, height = (
            (options.image_size, options.image_size)
            if options.image_size is not None
            else sizes.most_common(1)[0][0]
        )
        channels = 1 if gray else 3
        _check_array_size(len(found), channels, height, width, limits, path.stat().st_size)
        inputs = np.empty((len(found), channels, height, width), dtype=np.float32)
        for index, (info, _) in enumerate(found):
            try:
                inputs[index] = _pixels(_open_image(zip_file, info, limits), gray, width, height)
            except (OSError, SyntaxError, ValueError) as exc:  # a truncated or corrupt body
                raise DatasetInvalid(
                    f"image {info.filename!r} cannot be decoded: {exc}", field=FIELD
                ) from None
    if not in_folders:
        return TransferSet(arrays={"inputs": inputs}, labels=None, modality="image")
    folders = [member_path.parts[0] for member_path in paths]
    class_names = sorted(set(folders))
    index_of = {name: class_id for class_id, name in enumerate(class_names)}
    labels = np.array([index_of[folder] for folder in folders], dtype=np.int64)
    return TransferSet(
        arrays={"inputs": inputs}, labels=labels, modality="image", class_names=class_names
    )


def _image_members(infos: list[zipfile.ZipInfo]) -> list[ImageMember]:
    """Candidate image members with their paths, metadata folders and hidden files left out."""
    members = []
    for info in infos:
        member_path = archive.member_path(info.filename)
        if any(part.startswith(".") or part == "__MACOSX" for part in member_path.parts):
            continue
        members.append((info, member_path))
    members.sort(key=lambda member: member[1].as_posix())
    return members


def _scan_images(
    zip_file: archive.ArchiveReader, members: list[ImageMember], limits: DataLimits
) -> tuple[list[ImageMember], Counter[tuple[int, int]], bool]:
    """(the images, a count of their sizes, whether all are gray), reading only headers.

    Sizes and modes decide the output array before any image is decoded.
    """
    found: list[ImageMember] = []
    sizes: Counter[tuple[int, int]] = Counter()
    gray = True
    for info, member_path in members:
        image = _open_image(zip_file, info, limits)
        if image is None:
            continue
        found.append((info, member_path))
        sizes[image.size] += 1
        gray = gray and image.mode in _GRAY_MODES
        if len(found) > limits.max_rows:
            raise DatasetInvalid(
                f"more than {limits.max_rows} images; that is the limit", field=FIELD
            )
    if not found:
        raise DatasetInvalid("the zip archive holds no PNG or JPEG images", field=FIELD)
    return found, sizes, gray


def _class_paths(paths: list[PurePosixPath]) -> tuple[list[PurePosixPath], bool]:
    """(paths below any wrapping folder, whether every image is in a class folder)."""
    if len({path.parts[0] for path in paths}) == 1 and all(len(path.parts) >= 2 for path in paths):
        # One folder around everything is a wrapper, not a class: one class teaches nothing.
        paths = [PurePosixPath(*path.parts[1:]) for path in paths]
    in_folders = {len(path.parts) >= 2 for path in paths}
    if in_folders == {True, False}:
        loose = next(path for path in paths if len(path.parts) == 1)
        raise DatasetInvalid(
            f"image {loose.as_posix()!r} is outside the class folders; put every image in "
            "its class's folder (or none in folders, for an unlabelled set)",
            field=FIELD,
        )
    return paths, in_folders == {True}


def _check_array_size(
    images: int, channels: int, height: int, width: int, limits: DataLimits, file_bytes: int
) -> None:
    """Refuse images too large per image, or in all, before the array is allocated.

    In all, the decoded array may be no larger than the dataset may expand to
    (:meth:`DataLimits.decoded_cap`): black images compress a thousandfold.
    """
    if channels * height * width > limits.max_features:
        raise DatasetInvalid(
            f"images of {channels}x{height}x{width} values are over the limit of "
            f"{limits.max_features} per image; set data.image_size",
            field="data.image_size",
        )
    total = images * channels * height * width * 4
    cap = limits.decoded_cap(file_bytes)
    if total > cap:
        raise DatasetInvalid(
            f"{images} images of {channels}x{height}x{width} decode to {total} bytes, more "
            f"than this {file_bytes}-byte archive may expand to ({cap} bytes); "
            "set a smaller data.image_size",
            field="data.image_size",
        )


def _open_image(zip_file: archive.ArchiveReader, info: zipfile.ZipInfo, limits: DataLimits) -> Any:
    """The member as a lazily decoded PIL image, or ``None`` if it is not a PNG/JPEG.

    Only the header is parsed here: the pixel count is checked before anything decodes.
    """
    from PIL import Image, UnidentifiedImageError

    with zip_file.open(info) as file:
        data = file.read(limits.max_image_bytes + 1)
    if len(data) > limits.max_image_bytes:
        raise DatasetInvalid(
            f"image {info.filename!r} is over {limits.max_image_bytes} bytes", field=FIELD
        )
    try:
        image = Image.open(io.BytesIO(data), formats=_IMAGE_FORMATS)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError:
        image = None  # Pillow's own cap, above ours: the same refusal
    if image is None or image.width * image.height > limits.max_image_pixels:
        raise DatasetInvalid(
            f"image {info.filename!r} is over {limits.max_image_pixels} pixels", field=FIELD
        )
    return image


def _pixels(image: Any, gray: bool, width: int, height: int) -> np.ndarray:
    """The decoded image as float32 (C, height, width) in [0, 1]."""
    from PIL import Image

    if image.mode in _WIDE_GRAY_MODES:
        # Pillow's conversion of 16-bit gray to 8-bit clips rather than scales.
        image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)
        scale = 1.0
    else:
        image = image.convert("L" if gray else "RGB")
        scale = 255.0
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)
    if pixels.ndim == 3:
        return pixels.transpose(2, 0, 1)
    return pixels[None] if gray else np.repeat(pixels[None], 3, axis=0)
