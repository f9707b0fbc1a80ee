"""Loading a transfer set: the digest that keys cached teacher outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.worker.engine.data.factories import write_csv
from worker.engine.data import load_transfer_set, split
from worker.engine.spec import DataSpec


def test_digest_follows_content_and_options(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digit_arrays
    first = load_transfer_set(write_csv(tmp_path / "a.csv", x[:30], y[:30]))
    same_content = load_transfer_set(write_csv(tmp_path / "b.csv", x[:30], y[:30]))
    other_options = load_transfer_set(tmp_path / "a.csv", DataSpec(feature_columns=["f1"]))
    assert first.digest == same_content.digest != other_options.digest
    train, validation = split(first, 0.2, seed=0)
    assert len({first.digest, train.digest, validation.digest}) == 3
