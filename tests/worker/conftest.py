"""Fixtures of the worker-side service tests: the same databases, settings and apps as the API's.

The runner, the reconciler, upload inspection and webhook delivery act on
what the API wrote, so their tests build it through the API's fixtures.
"""

from tests.app.conftest import (  # noqa: F401 - fixtures are found by name
    _empty_tables,
    app,
    client,
    database_url,
    engine,
    settings,
    storage,
    tenants,
)
