"""Response shapes of the jobs endpoints (the request body is the engine's ``JobSpec``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
EventType = Literal[
    "status",
    "stage",
    "progress",
    "evaluation",
    "baseline_evaluation",
    "ladder_rung",
    "checkpoint",
    "resumed",
    "warning",
    "webhook",
    "terminal",
]


class JobProgress(BaseModel):
    """How far training is; loss terms, ``lr`` and ``epoch`` come along as extra fields."""

    model_config = ConfigDict(extra="allow")

    step: int
    total_steps: int | None
    fraction: float = Field(ge=0.0, le=1.0)
    eta_s: float | None = Field(default=None, description="estimated seconds left in training")
    samples_per_s: float | None = None


class JobError(BaseModel):
    """Why a job failed: a stable ``code`` (``teacher_incompatible``, ``out_of_memory``, …)."""

    code: str
    message: str
    field: str | None = Field(default=None, description="the spec field at fault, if any")


class JobWarning(BaseModel):
    """A pre-flight warning: the spec is valid but will likely give a poor student."""

    code: str = Field(description="stable: too_few_steps, time_budget_short, small_transfer_set, …")
    message: str
    field: str = Field(description="the spec field to change, e.g. training.epochs")


class JobVerdict(BaseModel):
    """Whether the student is fit to deploy, with the reasons and the criteria it was held to."""

    model_config = ConfigDict(extra="allow")

    deployable: bool
    reasons: list[str] = Field(default_factory=list)
    criteria: dict[str, Any] = Field(default_factory=dict)
    caveats: list[str] = Field(
        default_factory=list,
        description="criteria the test rows cannot settle: the threshold lies inside the 95% "
        "interval of the figure, so the verdict could have gone the other way",
    )


class JobOut(BaseModel):
    """A distillation job.

    ``metrics`` holds the latest validation figures while it runs and the
    report of ``metrics.json`` once it ended with a student: succeeded, or with a
    partial one (``partial``) when cancelled or out of time. A job cancelled during
    its export or evaluation has no figures on the test rows (``metrics.evaluated``
    false, ``metrics.cancelled_during`` the stage) and is never deployable.
    """

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    status: JobStatus
    teacher_model_id: uuid.UUID | None
    dataset_id: uuid.UUID | None
    test_dataset_id: uuid.UUID | None = Field(
        default=None,
        description="the dataset reported on instead of a test split "
        "(evaluation.test_dataset_id); null when none, or once it is deleted",
    )
    task: Literal["classification", "regression", "embedding"] | None
    attempt: int = Field(description="how many times a worker has started this job")
    progress: JobProgress | None
    metrics: dict[str, Any] | None
    error: JobError | None
    stop_reason: str | None = Field(
        description="completed, early_stopping, max_steps, time_budget or cancelled once "
        "training ended"
    )
    partial: bool = Field(
        description="the student is the best one found before a time limit or a cancellation"
    )
    warnings: list[JobWarning] = Field(
        default_factory=list,
        description="pre-flight warnings found when the job was checked against its teacher and "
        "dataset (steps too few, a time budget likely to cut the run short); the run logs them "
        "again as warning events",
    )
    spec: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @field_validator("warnings", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        # Jobs checked before warnings were kept, or still waiting for their inputs.
        return [] if value is None else value

    @computed_field(  # type: ignore[prop-decorator]
        description="the verdict of metrics.json once the job has a student: "
        "deployable or not, and why"
    )
    @property
    def verdict(self) -> JobVerdict | None:
        """The report's verdict object, when the stored metrics carry one."""
        found = (self.metrics or {}).get("verdict")
        if not isinstance(found, dict) or not isinstance(found.get("deployable"), bool):
            return None  # an older report's string verdict, or none yet
        return JobVerdict.model_validate(found)


class JobEventOut(BaseModel):
    """One entry of a job's event log; ``id`` is the cursor to resume after."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    type: EventType
    attempt: int
    data: dict[str, Any]
    created_at: datetime


class JobEventPage(BaseModel):
    """Events after the cursor, oldest first; pass the last ``id`` as ``after`` to go on."""

    data: list[JobEventOut]
    next_cursor: str | None = Field(
        description="the last event's id when more may follow at once; null on the last page"
    )


class ArtifactOut(BaseModel):
    """A file a job produced."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    bytes: int
    sha256: str
    media_type: str
    created_at: datetime


class ArtifactList(BaseModel):
    """A job's artifacts, by name."""

    data: list[ArtifactOut]
