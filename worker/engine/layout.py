"""Image layouts: the engine holds images channels-first, (N, C, H, W), as torch does;
a teacher may take them channels-last, (N, H, W, C), as a Keras model converted with
tf2onnx does.

Rows go to such a teacher (and to its drop-in student, which takes what the teacher
takes) transposed at the last moment, where a feed is built; everything between the
transfer set and the feed (statistics, the CNN student, augmentation) sees one layout.
Imports numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The channel counts an image axis is recognised by: grey, RGB, RGBA.
CHANNEL_COUNTS = (1, 3, 4)
#: (N, C, H, W) to (N, H, W, C).
TO_CHANNELS_LAST = (0, 2, 3, 1)
#: (N, H, W, C) to (N, C, H, W).
TO_CHANNELS_FIRST = (0, 3, 1, 2)


def _channels(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim in CHANNEL_COUNTS


def channels_last(sample_dims: Sequence[Any]) -> bool:
    """Whether an image input's per-sample dims (batch left out) are (H, W, C).

    The last one must be a channel count and the first must not be: (8, 8, 1) and
    (None, None, 3) are channels-last, (3, 32, 32) and (3, 4, 3) are not.
    """
    return len(sample_dims) == 3 and _channels(sample_dims[2]) and not _channels(sample_dims[0])


def channels_first_dims(sample_dims: Sequence[Any]) -> list[Any]:
    """The (C, H, W) of a channels-last input's (H, W, C)."""
    height, width, channels = sample_dims
    return [channels, height, width]


def wants_channels_last(shape: Sequence[int], sample_dims: Sequence[Any]) -> bool:
    """Whether channels-first rows of ``shape`` must be transposed for an input declared
    with ``sample_dims``: the input is channels-last and the rows' channels are its own."""
    return len(shape) == 4 and channels_last(sample_dims) and shape[1] == sample_dims[2]
