"""The distillation engine: a PyTorch library that turns a teacher and a transfer set into a
smaller, evaluated student.

It knows nothing of HTTP, SQL or Celery: it takes a spec, paths and callbacks
and returns a result (``worker.engine.pipeline.run``). Importing this package
is cheap and imports no torch; the API imports ``spec``, ``inspection`` and
``errors`` from it.
"""

import os

# OpenMP threads that wait by spinning hold their cores between torch's small kernels: on a
# CPU shared with anything else (another job, the API, a second training thread) a step of
# a small student then took 5-18x longer on two threads than on one. Waiting passively
# keeps two threads at least as fast as one. It must be set before torch loads OpenMP,
# so it is set as soon as the engine is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
