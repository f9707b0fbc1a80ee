"""Graceful shutdown of a job worker: the running job checkpoints and goes back to the queue.

Celery's warm shutdown (SIGTERM or SIGINT to the worker) waits for the running
task to finish, which for a training job can take hours. When it starts, the
worker's main process signals its pool children; a child running a job sets
:data:`app.jobs.execution.handback_requested`, and the job stops at its next
step, writes a checkpoint, is put back in the queue for another worker (which
resumes from that checkpoint), and the child returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any

from billiard.process import active_children
from celery.signals import worker_process_init, worker_shutting_down

log = logging.getLogger(__name__)

#: The signal a pool child gets when its worker shuts down.
HANDBACK_SIGNAL = signal.SIGUSR2


@worker_shutting_down.connect
def _tell_children(**_: Any) -> None:
    # Runs in the worker's main process, inside its signal handler.
    for child in active_children():
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, HANDBACK_SIGNAL)


@worker_process_init.connect
def _listen_in_child(**_: Any) -> None:
    from app.jobs.execution import handback_requested

    signal.signal(HANDBACK_SIGNAL, lambda *_: handback_requested.set())
