"""Response shapes of the datasets endpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DatasetStatus = Literal["processing", "ready", "invalid"]


class DatasetSummary(BaseModel):
    """What the engine read from a transfer set (``worker.engine.data.inspect_dataset``)."""

    format: Literal["npz", "safetensors", "csv", "parquet", "jsonl", "image_folders"]
    rows: int
    modality: Literal["tabular", "image", "sequence", "text"]
    feature_shape: list[int] | None = Field(description="per sample; null for text")
    has_labels: bool
    labelled_rows: int = Field(description="rows with a label; labels may be partial")
    label_kind: Literal["class", "value"] | None = Field(
        description="class ids or regression targets; null without labels"
    )
    num_classes: int | None
    class_names: list[str] | None
    bytes: int


class DatasetError(BaseModel):
    """Why a dataset is ``invalid``: the engine's code and message."""

    code: str
    message: str


class DatasetOut(BaseModel):
    """A transfer dataset."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    status: DatasetStatus
    format: str | None
    rows: int | None
    filename: str
    bytes: int
    sha256: str
    summary: DatasetSummary | None
    error: DatasetError | None
    created_at: datetime
    updated_at: datetime
