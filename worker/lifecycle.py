"""Graceful shutdown of a job worker: the running job checkpoints and goes back to the queue.

Celery's warm shutdown (SIGTERM or SIGINT to the worker) waits for the running
task to finish, which for a training job can take hours. When it starts, the
worker's main process signals its pool processes; the one running a job sets
:data:`handback_requested`, and the job stops at its next
step, writes a checkpoint, is put back in the queue for another worker (which
resumes from that checkpoint), and the task returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from billiard.process import active_children, current_process
from celery.signals import worker_shutting_down

#: The signal a pool process gets when its worker shuts down.
HANDBACK_SIGNAL = signal.SIGUSR2
#: billiard's name for the processes of a prefork pool (beat, embedded in a worker, is not).
_POOL_PROCESS = "ForkPoolWorker"
#: Exit status of a pool process ended at its job's hard time limit.
TIME_LIMIT_EXIT_STATUS = 75


@worker_shutting_down.connect
def _tell_pool(**_: Any) -> None:
    # Runs in the worker's main process, inside its signal handler.
    for child in active_children():
        if child.pid is not None and child.name.startswith(_POOL_PROCESS):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, HANDBACK_SIGNAL)


#: Set in a worker child when its worker shuts down: the running job checkpoints at its
#: next step and goes back to the queue.
handback_requested = threading.Event()


def listen_for_handback() -> None:
    """Make :data:`HANDBACK_SIGNAL` request a hand-back of the job this process runs.

    Called as each job starts, not when the pool process starts: billiard
    replaces the handlers of its pool processes after Celery's start-up hooks
    (with the threaded pool the filesystem broker uses, ``SIGUSR2`` included).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(HANDBACK_SIGNAL, lambda *_: handback_requested.set())


def end_pool_process() -> None:
    """End this process now if it is a prefork pool process, which runs one job and exits.

    Used at a job's hard time limit, once the job is failed and its attempt
    fenced: the parent starts a fresh pool process for the next job. Anywhere
    else (a thread pool, the runner called in-process) ending the process would
    take the whole worker with it; the run then stops at its next fenced write.
    """
    if current_process().name.startswith(_POOL_PROCESS):
        logging.shutdown()
        os._exit(TIME_LIMIT_EXIT_STATUS)


#: How long past a job's hard time limit the kernel ends its pool process, should the
#: limit's own thread never get to run (native code that holds the GIL).
DEADLINE_MARGIN_S = 60


def arm_process_deadline(seconds: float) -> bool:
    """Have the kernel end this pool process ``seconds`` from now (``SIGALRM``, no handler).

    The backstop behind the hard time limit's thread: a signal's default action needs
    no interpreter, so it ends a process whose native code never releases the GIL. The
    reconciler then finds the attempt's lease expired past its limit and fails the job
    with ``time_budget_exceeded``. Only in a prefork pool process's main thread (it runs
    one job and exits); elsewhere nothing is armed. Whether it was armed.
    """
    in_pool = current_process().name.startswith(_POOL_PROCESS)
    if not in_pool or threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(seconds + 0.999)))
    return True


def disarm_process_deadline() -> None:
    """Cancel a deadline :func:`arm_process_deadline` set."""
    if threading.current_thread() is threading.main_thread():
        signal.alarm(0)
