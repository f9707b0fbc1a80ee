"""Request and response shapes of the models endpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ModelStatus = Literal["processing", "ready", "invalid"]


class TensorSpecOut(BaseModel):
    """A named tensor: ``shape`` holds sizes, symbolic names (``"batch"``) or null."""

    name: str
    shape: list[int | str | None]
    dtype: str


class Signature(BaseModel):
    """A teacher's interface read without running it (the engine's ``TeacherSignature``)."""

    format: Literal["onnx", "safetensors", "huggingface"]
    inputs: list[TensorSpecOut]
    outputs: list[TensorSpecOut]
    parameters: int = Field(description="weight count; 0 for weightless graphs (tree ensembles)")
    bytes: int
    task: Literal["classification", "regression", "embedding"] | None
    output: str | None = Field(description="the output the student learns")
    output_kind: Literal["logits", "probabilities", "values", "embedding"] | None
    num_classes: int | None
    output_dim: int | None
    architecture: str | None
    modality: Literal["tabular", "image", "sequence", "text"] | None
    extra: dict[str, Any]


class ModelError(BaseModel):
    """Why a model is ``invalid``: the engine's code and message."""

    code: str
    message: str


class ModelOut(BaseModel):
    """A teacher model."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    status: ModelStatus
    format: str | None
    filename: str
    bytes: int
    sha256: str
    signature: Signature | None
    error: ModelError | None
    created_at: datetime
    updated_at: datetime
