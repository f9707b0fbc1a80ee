"""Checking that a reader's error names what is at fault."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from worker.engine.errors import EngineError


@contextmanager
def raises(
    exc_type: type[EngineError], *needles: str, field: str | None = None
) -> Iterator[pytest.ExceptionInfo[EngineError]]:
    """Context checking the error class and that its message (or field) names the problem."""
    with pytest.raises(exc_type) as exc_info:
        yield exc_info
    message = str(exc_info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    if field is not None:
        assert exc_info.value.field == field
