"""The Celery application: ``celery -A worker.celery_app worker`` (and ``beat``).

Settings come from the same ``DISTILL_*`` environment as the API; see
:mod:`worker.broker` for what they configure.
"""

from __future__ import annotations

import worker.lifecycle  # noqa: F401 - connects the graceful-shutdown signals
from app.config import get_settings
from worker.broker import create_celery

app = create_celery(get_settings())
