"""Whether a spec, a teacher and a transfer set fit together, from their descriptions alone.

The API runs these checks on a submitted job with the teacher's inspected
signature and the dataset's summary, before anything is queued; the pipeline
runs the same ones on the loaded data. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.engine.errors import DatasetInvalid, SpecInvalid, TeacherIncompatible
from worker.engine.signature import TeacherSignature
from worker.engine.spec import DistillationSpec


@dataclass(frozen=True)
class DataFacts:
    """What the checks need to know of a transfer set."""

    modality: str
    #: Per-sample shape of the inputs; ``None`` for untokenized text.
    feature_shape: tuple[int, ...] | None
    labelled_rows: int
    label_kind: str | None
    num_classes: int | None
    #: Image folders are resized to the teacher's input, so only their rank must match.
    resizable: bool = False

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> DataFacts:
        """Facts from :func:`worker.engine.data.inspect_dataset`'s summary."""
        shape = summary.get("feature_shape")
        return cls(
            modality=summary["modality"],
            feature_shape=None if shape is None else tuple(shape),
            labelled_rows=int(summary.get("labelled_rows") or 0),
            label_kind=summary.get("label_kind"),
            num_classes=summary.get("num_classes"),
            resizable=summary.get("format") == "image_folders",
        )


#: What each student architecture reads: (description, test of (is_text, per-sample shape)).
ARCHITECTURE_INPUTS: dict[str, tuple[str, Callable[[bool, tuple[int, ...]], bool]]] = {
    "mlp": ("numeric inputs (not token ids)", lambda text, shape: not text),
    "cnn": ("(C, H, W) images", lambda text, shape: not text and len(shape) == 3),
    "rnn": ("(T, F) sequences or text", lambda text, shape: text or len(shape) == 2),
    "transformer": ("(T, F) sequences or text", lambda text, shape: text or len(shape) == 2),
}


def require_inputs(architecture: str, *, text: bool, shape: tuple[int, ...], modality: str) -> None:
    """:class:`SpecInvalid` naming ``student.architecture`` if it cannot read these inputs."""
    need = ARCHITECTURE_INPUTS.get(architecture)
    if need is not None and not need[1](text, shape):
        raise SpecInvalid(
            f"student {architecture} needs {need[0]}; this data is {modality} with "
            f"per-sample shape {list(shape)}",
            field="student.architecture",
        )


def resolve_task(spec: DistillationSpec, signature: TeacherSignature) -> str:
    """The task named in the spec, else the teacher's; refuses a task the teacher can't serve."""
    kind = signature.output_kind
    task: str | None = spec.task or signature.task
    if task is None:
        task = {"logits": "classification", "probabilities": "classification"}.get(
            kind or "", "embedding" if kind == "embedding" else "regression"
        )
    if task == "classification" and kind in ("values", "embedding"):
        raise TeacherIncompatible(
            f"task classification needs a classifier teacher, but this teacher outputs {kind}",
            field="task",
        )
    return task


def check_modality(signature: TeacherSignature, data: DataFacts) -> None:
    """Text transfer sets need a teacher with a tokenizer, and text teachers need text."""
    text_teacher = signature.format == "huggingface" or signature.modality == "text"
    if data.modality == "text" and not text_teacher:
        raise TeacherIncompatible(
            "a text transfer set needs a teacher that ships its tokenizer (a Hugging Face folder)",
            field="dataset_id",
        )
    if text_teacher and data.modality != "text":
        raise DatasetInvalid(
            f"this teacher reads text, but the transfer set is {data.modality}; "
            "upload JSONL with a text field",
            field="dataset_id",
        )


def check_fits(signature: TeacherSignature, data: DataFacts) -> None:
    """The transfer set's per-sample shape must match the teacher's declared input."""
    if data.modality == "text" or data.feature_shape is None or not signature.inputs:
        return
    declared = signature.inputs[0].shape[1:]
    actual = list(data.feature_shape)
    mismatch = len(declared) != len(actual) or (
        not data.resizable
        and any(
            isinstance(d, int) and d > 0 and d != a for d, a in zip(declared, actual, strict=False)
        )
    )
    if mismatch:
        raise DatasetInvalid(
            f"the teacher's input {signature.inputs[0].name!r} takes samples of shape "
            f"{declared}, but the transfer set's inputs have shape {actual}",
            field="dataset_id",
        )


def check_labels(
    task: str, spec: DistillationSpec, data: DataFacts, num_classes: int | None
) -> None:
    """Labels the spec needs are there, and class labels fit the teacher's classes."""
    if spec.evaluation.baseline and data.labelled_rows == 0:
        raise SpecInvalid(
            "evaluation.baseline trains a student on labels alone, "
            "but the transfer set has no labels",
            field="evaluation.baseline",
        )
    if data.label_kind is None or task != "classification":
        return
    if data.label_kind != "class":
        raise DatasetInvalid(
            "a classification transfer set needs integer class labels", field="dataset_id"
        )
    if num_classes is not None and data.num_classes is not None and data.num_classes > num_classes:
        raise DatasetInvalid(
            f"label {data.num_classes - 1} is out of range: the teacher has {num_classes} classes",
            field="dataset_id",
        )


def check_job(spec: DistillationSpec, signature: TeacherSignature, data: DataFacts) -> str:
    """Every check above, in the order a user would fix them; returns the task."""
    task = resolve_task(spec, signature)
    check_modality(signature, data)
    check_fits(signature, data)
    check_labels(task, spec, data, signature.num_classes)
    architecture = spec.student.architecture
    if data.feature_shape is not None or data.modality == "text":
        require_inputs(
            architecture,
            text=data.modality == "text",
            shape=data.feature_shape or (),
            modality=data.modality,
        )
    return task
