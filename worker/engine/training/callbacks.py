"""The hooks a caller gives a run: progress rows, events, and a cancellation check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Callbacks:
    """Hooks the caller gives a run; every one is optional.

    ``on_progress`` gets a dict with step, total_steps, epoch, each loss term,
    lr, samples_per_s and eta_s. ``on_event`` gets an event kind (``checkpoint``,
    ``evaluation``, ``resumed``, ``warning``, ``stage``) and its data.
    ``should_cancel`` is called every step and must be cheap.

    A cancellation stops the run by raising :class:`~worker.engine.errors.Cancelled`
    after a checkpoint, so a later run resumes it. ``cancel_keeps_student``, asked
    when a cancellation stops training after at least one validation, may say
    otherwise: true ends training there, and the run goes on to export and report
    the best student so far (``stop_reason`` ``cancelled``, ``partial``).
    """

    on_progress: Callable[[dict[str, Any]], None] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    cancel_keeps_student: Callable[[], bool] | None = None

    def progress(self, data: dict[str, Any]) -> None:
        """Report one progress row, if the caller listens."""
        if self.on_progress is not None:
            self.on_progress(data)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """Report one event of ``kind``, if the caller listens."""
        if self.on_event is not None:
            self.on_event(kind, data)

    def cancelled(self) -> bool:
        """Whether the caller asks the run to stop now."""
        return self.should_cancel is not None and self.should_cancel()

    def keeps_student_on_cancel(self) -> bool:
        """Whether a cancellation ends training and keeps the best student, not the run."""
        return self.cancel_keeps_student is not None and self.cancel_keeps_student()
