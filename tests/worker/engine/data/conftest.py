from __future__ import annotations

import numpy as np
import pytest

from tests.worker.engine.factories import digits


@pytest.fixture(scope="module")
def digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (inputs, class ids), for writing in every supported format."""
    return digits()
