"""Suite-wide ordering: the longest test files start first.

``make test`` runs the suite in two processes, each taking whole files (pytest-xdist's
``--dist loadfile``) in the order collected here (``--no-loadscope-reorder``). A file
of a few minutes left to the end keeps one process busy while the other waits, so the
files marked ``slow`` (minutes each: real teachers, worker processes killed and
restarted) are handed out first, and the many short files fill in after them.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A stable sort: within each group, files and tests keep their collected order.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
