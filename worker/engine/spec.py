"""The job spec: what a distillation job means.

The API validates requests with these same models, so the service and the
engine can never disagree. Everything but the teacher and the dataset has a
default. Unknown fields are refused (a typo must not silently fall back to a
default). This module imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from worker.engine.errors import SpecInvalid

Task = Literal["classification", "regression", "embedding"]
#: Student architectures built from a spec's size knobs; a safetensors teacher's config names
#: one of them too. Each is a builder of the same name in ``students.STUDENTS``, and
#: tests/worker/engine/test_registries.py holds this list and the registries equal.
BuiltinArchitecture = Literal["mlp", "cnn", "rnn", "transformer"]
Architecture = Literal[BuiltinArchitecture, "auto"]
#: Each is a loss of the same name in ``losses.LOSSES``.
MethodName = Literal["kd", "mse", "mae", "cosine", "hint"]
ExportFormat = Literal["onnx", "safetensors"]
#: Quantized versions of ``student.onnx`` an export may add.
QuantizeFormat = Literal["int8"]

#: The loss each task gets when ``method.name`` is left out.
DEFAULT_METHOD: dict[str, MethodName] = {
    "classification": "kd",
    "regression": "mse",
    "embedding": "cosine",
}


class _Strict(BaseModel):
    # Infinity and NaN pass range checks such as gt=0 and would be stored as JSON null.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: Caps on explicit student sizes; together with the parameter estimate checked at
#: submission, they keep a spec from asking for more memory than a worker has.
MAX_STUDENT_WIDTH = 16384
MAX_STUDENT_LAYERS = 64
#: Every stage after the first halves the image, so more would pool nothing.
MAX_CNN_STAGES = 16


class StudentSpec(_Strict):
    """The student to build. Size knobs left out are designed by ``auto``."""

    architecture: Architecture = "auto"
    compression: Annotated[float, Field(ge=1.0, le=1e6)] | None = Field(
        default=10.0,
        description="Teacher parameters / student parameters (teacher bytes / student bytes "
        "for teachers without parameters, such as tree ensembles).",
    )
    max_parameters: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Upper bound on student parameters; wins over compression."
    )
    hidden_sizes: list[Annotated[int, Field(ge=1, le=MAX_STUDENT_WIDTH)]] | None = Field(
        default=None,
        max_length=MAX_STUDENT_LAYERS,
        description="mlp: width of each hidden layer. Explicit sizes are held to "
        "max_parameters (and to compression when given) at submission.",
    )
    channels: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        default=None,
        max_length=MAX_CNN_STAGES,
        description="cnn: channels of each convolution stage.",
    )
    hidden_size: Annotated[int, Field(ge=1, le=MAX_STUDENT_WIDTH)] | None = Field(
        default=None, description="rnn/transformer: hidden width."
    )
    num_layers: Annotated[int, Field(ge=1, le=128)] | None = Field(
        default=None, description="rnn/transformer: number of layers."
    )
    num_heads: Annotated[int, Field(ge=1, le=128)] | None = Field(
        default=None, description="transformer: attention heads."
    )
    cell: Literal["gru", "lstm"] = Field(default="gru", description="rnn: recurrent cell.")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.0,
        description="Dropout rate while the student trains, in every architecture (a "
        "transformers student's attention and hidden layers too, whatever rate its teacher "
        "was pretrained with). A student that learns from a teacher's soft outputs rarely "
        "needs it.",
    )
    max_latency_ms: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None,
        description="Upper bound on the student's batch-1 latency in milliseconds, in "
        "onnxruntime on the worker's device (the exported file; torch where the teacher has "
        "no ONNX file to compare with). The student ladder of auto students keeps the "
        "smallest rung within it; the verdict holds the chosen student to it as to "
        "evaluation.accept.max_latency_ms (the tighter of the two).",
    )
    ladder: bool = Field(
        default=True,
        description="architecture auto with no size asked for (no hidden_sizes, channels, "
        "hidden_size, num_layers or num_heads; compression at its default): train a ladder "
        "of up to five students (MLP widths for tables, CNN widths for images, and for a "
        "transformers teacher encoders designed at geometric compressions, from the largest "
        "that still starts from the teacher's layers down to the asked one) and keep the "
        "smallest that meets evaluation.accept on the validation rows; false trains one "
        "student of the designed size.",
    )
    init_from_teacher: bool = Field(
        default=True,
        description="transformers teachers: initialise the student from a subset of the "
        "teacher's layers.",
    )
    vocabulary: Literal["teacher", "transfer"] = Field(
        default="teacher",
        description="transformers teachers: 'teacher' keeps a row for every token of the "
        "teacher's vocabulary (low-rank for rare ones when the budget needs it); 'transfer' "
        "keeps the teacher's rows of the tokens the transfer set uses and one shared row for "
        "every other id, which leaves more of the budget to layers. Either way the student "
        "takes the teacher's input_ids.",
    )


class LossTerm(_Strict):
    name: MethodName
    weight: Annotated[float, Field(gt=0.0, le=1e6)] = 1.0


#: The one message of each field that takes "auto" or a number, whichever way it is wrong.
_AUTO_OR_NUMBER = {
    "method.temperature": 'must be "auto" or a number above 0 and at most 100',
    "method.mixup": 'must be "auto" or a number of rows per row from 0 to 64',
    "training.epochs": 'must be "auto" or a whole number of epochs from 1 to 10000',
    "training.learning_rate": 'must be "auto" or a number above 0 and at most 10',
}


def _in_one_message(value: Any, handler: ValidatorFunctionWrapHandler, message: str) -> Any:
    """``value`` validated as its field's union, with ``message`` as the one error: the field
    is named once, not once per member of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(message) from None


class MethodSpec(_Strict):
    """How the student learns from the teacher."""

    name: MethodName | None = Field(
        default=None, description="Main loss; inferred from the task when omitted."
    )
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] | Literal["auto"] = Field(
        default="auto",
        description='kd: the softmax temperature of teacher and student. "auto": 1 for a '
        "teacher whose outputs are probabilities (a scikit-learn classifier, a softmax head: "
        "they are already soft targets, and tempering their logs flattens them), 4 for "
        "logits.",
    )
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.9,
        description="kd: weight of the soft (teacher) term; 1 - alpha goes to cross-entropy "
        "on labels where labels exist.",
    )
    extra_terms: list[LossTerm] = Field(
        default_factory=list,
        description="Further losses added to the main one, each with its weight "
        "(e.g. a hint term beside kd).",
    )
    hint_layer: str | None = Field(
        default=None,
        description="hint: the teacher layer (torch module name or ONNX tensor name) whose "
        "features the student matches; chosen automatically when omitted.",
    )
    mixup: Annotated[float, Field(ge=0.0, le=64.0)] | Literal["auto"] = Field(
        default="auto",
        description="Rows mixed from random pairs of training rows, labelled by the teacher "
        "and added to the training split, as a number per training row (0: none). "
        '"auto": 4 a row for tables of numbers of up to 10,000 training rows, none '
        "otherwise. Validation and test rows are never mixed; an epoch passes over the mixed "
        "rows too.",
    )
    teacher_outputs: Literal["cached", "online"] = Field(
        default="cached",
        description="cached: run the teacher once over the transfer set; online: every step.",
    )

    @field_validator("temperature", "mixup", mode="wrap")
    @classmethod
    def _auto_or_number(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        return _in_one_message(value, handler, _AUTO_OR_NUMBER[f"method.{info.field_name}"])


class TrainingSpec(_Strict):
    """How the student trains. ``epochs: "auto"`` plans the run (``worker.engine.planning``)."""

    epochs: Annotated[int, Field(ge=1, le=10000)] | Literal["auto"] = Field(
        default="auto",
        description='"auto": enough optimizer steps for the data and the student size (a '
        "floor of steps, at least a few epochs, within max_steps and max_minutes), with early "
        "stopping on validation; or a number of epochs.",
    )
    batch_size: Annotated[int, Field(ge=1, le=65536)] | Literal["auto"] = Field(
        default="auto",
        description='Rows per optimizer step. "auto": 32 for rows of text tokens (a '
        "transformer or recurrent student learns more from the same sentences in smaller "
        "steps), 128 for other data.",
    )
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] | Literal["auto"] = Field(
        default="auto",
        description='Peak learning rate. "auto": 1e-3, or 3e-4 for a transformers student '
        "whose layers start as the teacher's, with bridges over the layers it skips (it "
        "starts close to the teacher, and a larger step undoes that start).",
    )
    weight_decay: Annotated[float, Field(ge=0.0, le=10.0)] = 0.01
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    grad_clip_norm: Annotated[float, Field(gt=0.0)] | None = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    max_minutes: Annotated[float, Field(gt=0.0, le=7 * 24 * 60)] = 60.0
    max_steps: Annotated[int, Field(ge=1)] | None = None
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Stop after this many epochs without a better validation fidelity "
        '(under epochs "auto": a quarter of the planned epochs when left out).',
    )
    checkpoint_every_steps: Annotated[int, Field(ge=1)] | None = None
    checkpoint_every_minutes: Annotated[float, Field(gt=0.0)] | None = 10.0

    @field_validator("epochs", "learning_rate", mode="wrap")
    @classmethod
    def _auto_or_number(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        return _in_one_message(value, handler, _AUTO_OR_NUMBER[f"training.{info.field_name}"])


class AcceptSpec(_Strict):
    """When a student is deployable: every criterion met on the test rows (None: unchecked)."""

    min_metric_ratio: Annotated[float, Field(ge=0.0, le=10.0)] | None = Field(
        default=0.97,
        description="Classification scored against labels: the student's accuracy divided "
        "by the teacher's must be at least this. Not checked where the teacher's outputs are "
        "the reference (no labels, and always for embeddings): there the student's metric is "
        "its agreement or cosine with the teacher, which min_agreement or min_cosine judges.",
    )
    max_r2_drop: Annotated[float, Field(ge=0.0)] | None = Field(
        default=0.05,
        description="Regression: the teacher's R² minus the student's must be at most this "
        "(a drop, not a ratio, since R² can be zero or negative).",
    )
    min_agreement: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=0.95,
        description="Classification: the fraction of test rows where the student's top class "
        "is the teacher's must be at least this.",
    )
    min_cosine: Annotated[float, Field(ge=-1.0, le=1.0)] | None = Field(
        default=0.9,
        description="Embeddings: the mean cosine between the student's and the teacher's "
        "embeddings must be at least this.",
    )
    max_latency_ms: Annotated[float, Field(gt=0.0)] | None = Field(
        default=None,
        description="The student's batch-1 latency in milliseconds (onnxruntime on the "
        "exported file where there is one) must be at most this; unbounded by default.",
    )
    min_speedup: Annotated[float, Field(ge=0.0)] | None = Field(
        default=1.0,
        description="The teacher's batch-1 latency divided by the student's must be at "
        "least this: by default the student must not be slower.",
    )
    min_compression: Annotated[float, Field(ge=0.0)] | None = Field(
        default=1.0,
        description="``compression`` (teacher / student parameters, or bytes for teachers "
        "without parameters) must be at least this: by default the student must not be larger.",
    )


class EvaluationSpec(_Strict):
    validation_split: Annotated[float, Field(gt=0.0, lt=0.9)] = Field(
        default=0.1,
        description="Fraction of the transfer set held out for early stopping and choosing "
        "the best step; never reported as the result.",
    )
    test_split: Annotated[float, Field(gt=0.0, lt=0.9)] = Field(
        default=0.15,
        description="Fraction of the transfer set held out for the reported figures, used "
        "for no choice at all (stratified by class like the validation split). Ignored "
        "when a test set is given.",
    )
    test_dataset_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="A dataset (same format and features as the transfer set) to report on "
        "instead of a test split; every row of the transfer set then trains or validates.",
    )
    baseline: bool | None = Field(
        default=None,
        description="Also train the same student on labels alone, to show what distillation "
        "added. None (default): when the transfer set has labels; true needs labels.",
    )
    accept: AcceptSpec = Field(
        default_factory=AcceptSpec,
        description="The acceptance criteria behind metrics.json's verdict.",
    )

    @model_validator(mode="after")
    def _room_for_training(self) -> EvaluationSpec:
        if self.test_dataset_id is None and self.validation_split + self.test_split >= 0.9:
            raise ValueError("validation_split + test_split must leave at least 10% to train on")
        return self


class ExportSpec(_Strict):
    formats: list[ExportFormat] = Field(
        default_factory=lambda: list[ExportFormat](["onnx", "safetensors"]), min_length=1
    )
    quantize: list[QuantizeFormat] = Field(
        default_factory=list,
        description="Quantized students written beside student.onnx: int8 writes "
        "student.int8.onnx (int8 weights; convolution students also int8 activations, "
        "calibrated on transfer-set rows), evaluated like student.onnx under metrics.json's "
        "quantized. Needs onnx in formats. A quantization that fails is a warning, not a "
        "failed job.",
    )

    @field_validator("formats", "quantize")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("must not repeat")
        return v

    @model_validator(mode="after")
    def _quantize_needs_onnx(self) -> ExportSpec:
        if self.quantize and "onnx" not in self.formats:
            raise ValueError("quantize needs onnx in formats: it quantizes student.onnx")
        return self


class DataSpec(_Strict):
    """How the transfer set is read."""

    label_column: str | None = Field(
        default="label", description="CSV/Parquet: label column, if present."
    )
    feature_columns: list[str] | None = Field(
        default=None, description="CSV/Parquet: feature columns (default: all but the label)."
    )
    max_length: Annotated[int, Field(ge=1, le=8192)] = 128
    image_size: Annotated[int, Field(ge=4, le=1024)] | None = Field(
        default=None, description="Image folders: resize to this square size (default: teacher's)."
    )


class DistillationSpec(_Strict):
    """What to distil and how; shared by API jobs and local engine runs."""

    task: Task | None = Field(default=None, description="Inferred from the teacher when omitted.")
    student: StudentSpec = Field(default_factory=StudentSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    data: DataSpec = Field(default_factory=DataSpec)

    @model_validator(mode="after")
    def _consistent(self) -> DistillationSpec:
        if self.method.name == "kd" and self.task not in (None, "classification"):
            raise ValueError("method kd needs task classification")
        if self.method.name == "cosine" and self.task not in (None, "embedding"):
            raise ValueError("method cosine needs task embedding")
        if self.method.name in ("mse", "mae") and self.task == "classification":
            raise ValueError(f"method {self.method.name} is for regression or embedding teachers")
        return self

    def method_for(self, task: str) -> MethodName:
        """The main loss for ``task``: the one named, else the task's default."""
        return self.method.name or DEFAULT_METHOD[task]


class JobSpec(DistillationSpec):
    """A job submitted to the service: teacher and dataset by id."""

    teacher_model_id: str = Field(min_length=1, max_length=64)
    dataset_id: str = Field(min_length=1, max_length=64)
    webhook_url: str | None = Field(default=None, max_length=2048)

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http:// or https:// URL")
        return v


class PathRef(_Strict):
    path: str = Field(min_length=1)


class LocalJobSpec(DistillationSpec):
    """A job for the engine CLI: teacher, dataset and an optional test set by file path."""

    teacher: PathRef
    dataset: PathRef
    test_dataset: PathRef | None = Field(
        default=None,
        description="A dataset to report on instead of a test split of the transfer set.",
    )

    @model_validator(mode="after")
    def _test_set_by_path(self) -> LocalJobSpec:
        if self.evaluation.test_dataset_id is not None:
            raise ValueError("a local spec names its test set by test_dataset.path, not by id")
        return self


def _field_name(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "spec"


def spec_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as ``[{"field": "training.epochs", "reason": ...}]``."""
    return [{"field": _field_name(e["loc"]), "reason": e["msg"]} for e in exc.errors()]


def parse_spec(data: Any, model: type[DistillationSpec] = LocalJobSpec) -> Any:
    """Validate ``data`` as ``model``; a :class:`SpecInvalid` naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = spec_errors(exc)
        first = errors[0]
        detail = "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
        raise SpecInvalid(detail, field=first["field"]) from None


def load_local_spec(path: str | Path) -> LocalJobSpec:
    """Read a CLI spec file; relative teacher/dataset paths are taken from the spec's folder."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecInvalid(f"cannot read spec {path}: {exc}") from None
    spec: LocalJobSpec = parse_spec(data, LocalJobSpec)
    for ref in (spec.teacher, spec.dataset, spec.test_dataset):
        if ref is None:
            continue
        p = Path(ref.path)
        if not p.is_absolute():
            ref.path = str((path.parent / p).resolve())
    return spec
