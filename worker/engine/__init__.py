"""The distillation engine: a PyTorch library that turns a teacher and a transfer set into a
smaller, evaluated student.

It knows nothing of HTTP, SQL or Celery: it takes a spec, paths and callbacks
and returns a result (``worker.engine.pipeline.run``). Importing this package
is cheap and imports no torch; the API imports ``spec``, ``inspection`` and
``errors`` from it.
"""
