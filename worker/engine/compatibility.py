"""Whether a spec, a teacher and a transfer set fit together, from their descriptions alone.

The API runs these checks on a submitted job with the teacher's inspected
signature and the dataset's summary, before anything is queued; the pipeline
runs the same ones on the loaded data. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.engine.data.mixup import unmixable
from worker.engine.errors import DatasetInvalid, SpecInvalid, TeacherIncompatible
from worker.engine.layout import channels_first_dims, channels_last
from worker.engine.signature import TeacherSignature
from worker.engine.spec import DistillationSpec, StudentSpec


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
    # The engine holds images channels-first; they are transposed where the teacher runs.
    expected = (
        channels_first_dims(declared)
        if data.modality == "image" and channels_last(declared)
        else declared
    )
    mismatch = len(expected) != len(actual) or (
        not data.resizable
        and any(
            isinstance(d, int) and d > 0 and d != a for d, a in zip(expected, actual, strict=False)
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


#: The spec field a caller's test set is named by.
TEST_SET_FIELD = "evaluation.test_dataset_id"


def check_test_set(signature: TeacherSignature, transfer: DataFacts, test: DataFacts) -> None:
    """A caller's test set must read like the transfer set: the same modality and per-sample
    shape (only the rank for image folders, which are resized), and the teacher must read it.

    Raises :class:`DatasetInvalid` naming ``evaluation.test_dataset_id``.
    """
    if test.modality != transfer.modality:
        raise DatasetInvalid(
            f"the test set is {test.modality} but the transfer set is {transfer.modality}",
            field=TEST_SET_FIELD,
        )
    if test.feature_shape is not None and transfer.feature_shape is not None:
        same = (
            len(test.feature_shape) == len(transfer.feature_shape)
            if test.resizable or transfer.resizable
            else test.feature_shape == transfer.feature_shape
        )
        if not same:
            raise DatasetInvalid(
                f"the test set's samples have shape {list(test.feature_shape)}, the transfer "
                f"set's {list(transfer.feature_shape)}",
                field=TEST_SET_FIELD,
            )
    try:
        check_fits(signature, test)
    except DatasetInvalid as exc:
        raise DatasetInvalid(
            exc.message.replace("the transfer set's", "the test set's"), field=TEST_SET_FIELD
        ) from None


#: The most parameters any student may have, whatever its budget: 1 GiB of fp32 weights
#: (about 4 GiB with gradients and optimizer state).
MAX_STUDENT_PARAMETERS = 250_000_000
#: The architecture ``auto`` builds for each modality (``students.AUTO_BY_MODALITY``; a
#: test holds the two equal). Text with a transformers teacher gets its own student instead.
AUTO_ARCHITECTURE = {"tabular": "mlp", "image": "cnn", "sequence": "rnn", "text": "transformer"}
# Bytes per fp32 parameter: a byte budget (tree ensembles) converts at this rate.
_BYTES_PER_PARAMETER = 4


@dataclass(frozen=True)
class StudentShape:
    """What the size of a student depends on beyond its own knobs; 0 where not known."""

    #: Per-sample input shape (empty for text: token ids).
    input_shape: tuple[int, ...]
    output_dim: int
    text: bool


def _linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def _mlp_parameters(hidden_sizes: list[int], shape: StudentShape) -> int:
    width, total = math.prod(shape.input_shape), 0
    for size in hidden_sizes:
        total, width = total + _linear(width, size), size
    return total + _linear(width, shape.output_dim)


def _cnn_parameters(channels: list[int], shape: StudentShape) -> int:
    width, total = shape.input_shape[0] if shape.input_shape else 0, 0
    for size in channels:
        # A bias-free 3x3 convolution and a batch norm's weight and bias.
        total, width = total + 9 * width * size + 2 * size, size
    return total + _linear(width, shape.output_dim)


def _rnn_parameters(student: StudentSpec, hidden: int, shape: StudentShape) -> int:
    gates = 4 if student.cell == "lstm" else 3
    first = hidden if shape.text else (shape.input_shape[-1] if shape.input_shape else 0)
    total = 0
    for layer in range(student.num_layers or 1):
        width = first if layer == 0 else hidden
        total += gates * (width * hidden + hidden * hidden + 2 * hidden)
    return total + _linear(hidden, shape.output_dim)


def _transformer_parameters(student: StudentSpec, hidden: int, shape: StudentShape) -> int:
    # Per block: two layer norms, qkv, output projection and a 4x feed-forward.
    block = 4 * hidden + _linear(hidden, 3 * hidden) + _linear(hidden, hidden)
    block += _linear(hidden, 4 * hidden) + _linear(4 * hidden, hidden)
    embed = 0 if shape.text else _linear(shape.input_shape[-1] if shape.input_shape else 1, hidden)
    positions = 0 if shape.text else (shape.input_shape[0] if shape.input_shape else 0) * hidden
    blocks = (student.num_layers or 2) * block
    return embed + positions + blocks + 2 * hidden + _linear(hidden, shape.output_dim)


def explicit_student_parameters(
    architecture: str, student: StudentSpec, shape: StudentShape
) -> tuple[int, str] | None:
    """(parameters, the knob that sets them) of a student whose widths the spec gives.

    ``None`` when the widths are left to the budget. What is not known from the
    descriptions (a text teacher's vocabulary, the tokenized length) counts as
    nothing, so the estimate never exceeds the student that gets built.
    """
    if architecture == "mlp" and student.hidden_sizes:
        return _mlp_parameters(student.hidden_sizes, shape), "hidden_sizes"
    if architecture == "cnn" and student.channels:
        return _cnn_parameters(student.channels, shape), "channels"
    if architecture == "rnn" and student.hidden_size is not None:
        return _rnn_parameters(student, student.hidden_size, shape), "hidden_size"
    if architecture == "transformer" and student.hidden_size is not None:
        return _transformer_parameters(student, student.hidden_size, shape), "hidden_size"
    return None


def student_budget(student: StudentSpec, signature: TeacherSignature) -> tuple[int, str] | None:
    """(most parameters, the field that sets it) that explicit sizes are held to.

    ``max_parameters`` always; ``compression`` only when the spec names it, since its
    default sizes ``auto`` students and explicit sizes are the user's own choice.
    """
    if student.max_parameters is not None:
        return student.max_parameters, "max_parameters"
    if student.compression is None or "compression" not in student.model_fields_set:
        return None
    if signature.parameters > 0:
        return int(signature.parameters / student.compression), "compression"
    if signature.bytes > 0:
        return int(signature.bytes / student.compression / _BYTES_PER_PARAMETER), "compression"
    return None


def _output_width(signature: TeacherSignature) -> int:
    if signature.output_dim:
        return signature.output_dim
    shape = signature.outputs[0].shape if signature.outputs else []
    return shape[-1] if len(shape) > 1 and isinstance(shape[-1], int) and shape[-1] > 0 else 1


def check_student_size(
    spec: DistillationSpec, signature: TeacherSignature, data: DataFacts
) -> None:
    """Explicit student sizes within the spec's budget and :data:`MAX_STUDENT_PARAMETERS`.

    :class:`SpecInvalid` naming the size knob, before anything is allocated.
    """
    student = spec.student
    text = data.modality == "text"
    architecture: str = student.architecture
    if architecture == "auto":
        if text and signature.format == "huggingface":
            return  # the transformers student is sized from the teacher's own config
        architecture = AUTO_ARCHITECTURE.get(data.modality, "")
    shape = StudentShape(
        input_shape=() if text else tuple(data.feature_shape or ()),
        output_dim=_output_width(signature),
        text=text,
    )
    estimate = explicit_student_parameters(architecture, student, shape)
    if estimate is None:
        return
    parameters, knob = estimate
    budget = student_budget(student, signature)
    if budget is not None and parameters > budget[0]:
        raise SpecInvalid(
            f"this {architecture} student would have {parameters:,} parameters, over "
            f"student.{budget[1]}'s budget of {budget[0]:,}; give smaller sizes or a larger budget",
            field=f"student.{knob}",
        )
    if parameters > MAX_STUDENT_PARAMETERS:
        raise SpecInvalid(
            f"this {architecture} student would have {parameters:,} parameters; "
            f"the most a student may have is {MAX_STUDENT_PARAMETERS:,}",
            field=f"student.{knob}",
        )


def check_vocabulary(spec: DistillationSpec, signature: TeacherSignature) -> None:
    """``student.vocabulary: "transfer"`` cuts a transformers teacher's word embeddings only."""
    if spec.student.vocabulary == "teacher":
        return
    if signature.format != "huggingface" or spec.student.architecture not in (
        "auto",
        "hf_encoder",
    ):
        raise SpecInvalid(
            'student.vocabulary "transfer" applies to an hf_encoder student of a Hugging '
            f"Face transformers teacher; this teacher is {signature.format} and the student "
            f"{spec.student.architecture}",
            field="student.vocabulary",
        )


def check_mixup(spec: DistillationSpec, data: DataFacts) -> None:
    """A number of ``method.mixup`` rows needs a table to mix (``"auto"`` only where one is)."""
    mixup = spec.method.mixup
    if mixup == "auto" or mixup == 0 or data.modality == "tabular":
        return
    raise unmixable(data.modality)


def check_job(spec: DistillationSpec, signature: TeacherSignature, data: DataFacts) -> str:
    """Every check above, in the order a user would fix them; returns the task."""
    task = resolve_task(spec, signature)
    check_modality(signature, data)
    check_fits(signature, data)
    check_labels(task, spec, data, signature.num_classes)
    check_vocabulary(spec, signature)
    check_mixup(spec, data)
    architecture = spec.student.architecture
    if data.feature_shape is not None or data.modality == "text":
        require_inputs(
            architecture,
            text=data.modality == "text",
            shape=data.feature_shape or (),
            modality=data.modality,
        )
    check_student_size(spec, signature, data)
    return task
