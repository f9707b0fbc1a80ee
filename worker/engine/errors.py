"""Typed engine errors.

Every error the engine raises on purpose is an :class:`EngineError` with a
stable ``code``; the service maps codes to HTTP statuses and job errors, and
the CLI prints them. ``field`` names the spec field or input the error is
about, when there is one.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class: a failure with a stable, machine-readable ``code``."""

    code = "engine_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class SpecInvalid(EngineError):
    """The job spec does not validate, or contradicts the teacher or data."""

    code = "spec_invalid"


class UnsupportedFormat(EngineError):
    """A file whose format is refused on purpose (pickle-based) or unknown."""

    code = "unsupported_format"


class TeacherInvalid(EngineError):
    """The teacher file is malformed or cannot be loaded."""

    code = "teacher_invalid"


class TeacherIncompatible(EngineError):
    """The teacher loads but cannot be distilled with this data or spec."""

    code = "teacher_incompatible"


class DatasetInvalid(EngineError):
    """The transfer set is malformed, empty or does not fit the teacher."""

    code = "dataset_invalid"


class ArchiveUnsafe(EngineError):
    """A zip archive with an escaping path, a link, or over a size cap."""

    code = "archive_unsafe"


class NonFiniteLoss(EngineError):
    """Training produced a NaN or infinite loss; the run stops at once."""

    code = "non_finite_loss"


class Cancelled(EngineError):
    """The cancellation callback asked the run to stop."""

    code = "cancelled"


class OutOfMemory(EngineError):
    """The device ran out of memory."""

    code = "out_of_memory"


class ExportFailed(EngineError):
    """An exported artifact does not reproduce the trained student."""

    code = "export_failed"


class TimeBudgetExceeded(EngineError):
    """The job's time budget ran out before there was a student to keep."""

    code = "time_budget_exceeded"
