"""What a teacher looks like from outside: its inputs, outputs, size and task.

Plain dataclasses, no torch: the API stores a teacher's signature on upload.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Dim = int | str | None
OutputKind = Literal["logits", "probabilities", "values", "embedding"]
TeacherFormat = Literal["onnx", "safetensors", "huggingface"]


@dataclass
class TensorSpec:
    """A named tensor: ``shape`` holds ints, symbolic names (``"batch"``) or None."""

    name: str
    shape: list[Dim]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TeacherSignature:
    """A teacher's interface, read without running it.

    ``output`` names the output the student learns (for scikit-learn classifiers,
    the probability tensor rather than the label). ``output_kind`` says how to
    read it: ``logits`` and ``probabilities`` for classifiers, ``values`` for
    regressors, ``embedding`` for encoders. ``parameters`` is 0 for models
    without weight tensors (tree ensembles), whose size is ``bytes``.
    """

    format: TeacherFormat
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int
    bytes: int
    task: Literal["classification", "regression", "embedding"] | None
    output: str | None = None
    output_kind: OutputKind | None = None
    num_classes: int | None = None
    output_dim: int | None = None
    architecture: str | None = None
    modality: Literal["tabular", "image", "sequence", "text"] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherSignature:
        data = dict(data)
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        return cls(**data)
