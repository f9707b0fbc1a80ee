"""One distillation job from files to artifacts: the engine's public entry point.

``run(spec, teacher_path=..., dataset_path=..., out_dir=...)`` goes through
the stages below, each a function of its own, in this order:

1. read the transfer set and load the teacher;
2. :func:`_fit_transfer_set`: tokenise text for the teacher, settle the task,
   check that data and teacher fit each other and the spec, split off validation
   and test rows (or take the caller's test set);
3. :func:`_teacher_targets`: the teacher's outputs, computed once (and cached)
   or left to the loop (``online``), plus hint features;
4. :func:`_design_student`: the student and the loss it trains with;
5. :func:`_train_student`, and :func:`_train_baseline` when the transfer set has
   labels (or the spec asks);
6. :func:`_export`: the student's files, and its int8 version when the spec asks;
7. :func:`_evaluate`: teacher and student (and baseline, and int8 student) on the test
   rows, run from the exported files in onnxruntime where there are files, and the verdict;
8. :func:`_write_reports` and :func:`_report`: metrics, card, curves, and what the
   caller gets back.

A cancellation that keeps the student (``Callbacks.cancel_keeps_student``) is honoured
wherever it arrives once a student exists: training and the baseline stop at their next
step and the best student so far is exported and evaluated; an export runs to its end (no
file is left half-written) and the run stops before the evaluation; the evaluation stops at
its next check, and none of its figures is reported (``metrics.json``'s ``evaluated`` false).
The run then ends ``cancelled`` and ``partial``, and its student is never deployable.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import worker.engine.components  # noqa: F401 - registers every built-in teacher runtime and student
from worker.engine import evaluation, export, ladder, report
from worker.engine.compatibility import DataFacts, check_fits, check_labels, resolve_task
from worker.engine.data import TransferSet, load_transfer_set, tokenize
from worker.engine.data.mixup import mixed_row_count, with_mixed_rows
from worker.engine.data.splitting import split_three
from worker.engine.errors import Cancelled, ExportFailed, TeacherIncompatible
from worker.engine.evaluation import OnnxFile
from worker.engine.evaluation.verdict import ACCEPT_METRIC
from worker.engine.export import Quantized, sha256_file
from worker.engine.losses import LabelsOnlyLoss, build_loss, resolved_temperature
from worker.engine.planning import pass_batch_size
from worker.engine.preprocessing import fit_preprocessing, standardised_loss, wrap_student
from worker.engine.signature import TeacherSignature
from worker.engine.spec import DistillationSpec, StudentSpec
from worker.engine.students import StudentContext, build_student, count_parameters, rebuild_student
from worker.engine.teachers import TeacherRuntime, load_teacher
from worker.engine.training import (
    Callbacks,
    TrainingData,
    TrainResult,
    cache_key,
    cached_teacher_outputs,
    compute_teacher_outputs,
    keep_on_device_if_small,
    latest_checkpoint,
    plan_for_data,
    predict,
    resolve_device,
    to_tensors,
    train,
)
from worker.engine.training.teacher_outputs import TeacherPassLimits

__all__ = [
    "ARTIFACT_MEDIA_TYPES",
    "Artifact",
    "LabelsOnlyLoss",
    "RunResult",
    "looks_like_probabilities",
    "run",
]

#: Media types of the artifacts every job ends with.
ARTIFACT_MEDIA_TYPES: dict[str, str] = {
    "student.onnx": "application/onnx",
    "student.int8.onnx": "application/onnx",
    "student.safetensors": "application/octet-stream",
    "student_config.json": "application/json",
    "metrics.json": "application/json",
    "model_card.md": "text/markdown; charset=utf-8",
    "training_curves.png": "image/png",
    # Only when a student ladder ran (tabular ``auto`` students).
    "student_ladder.png": "image/png",
}


@dataclass
class Artifact:
    """One file a job produced, with what a store needs to serve it."""

    name: str
    path: Path
    bytes: int
    sha256: str
    media_type: str

    @classmethod
    def of(cls, path: Path, media_type: str) -> Artifact:
        """The artifact for the file at ``path``."""
        return cls(path.name, path, path.stat().st_size, sha256_file(path), media_type)

    def to_dict(self) -> dict[str, Any]:
        """Name, bytes, sha256 and media type, as JSON."""
        return {
            "name": self.name,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "media_type": self.media_type,
        }


@dataclass
class RunResult:
    """What a job returns: its metrics and artifacts, and how training ended.

    ``metrics`` is ``metrics.json``; ``deployable`` repeats its
    ``verdict.deployable``. ``partial`` is True when training stopped at its time
    budget or on a cancellation that keeps the student (``stop_reason``
    ``cancelled``): the best student so far was still exported, and evaluated unless
    the cancellation came during its export or evaluation (``metrics["evaluated"]``
    false, ``metrics["cancelled_during"]`` the stage).
    """

    task: str
    metrics: dict[str, Any]
    artifacts: list[Artifact]
    stop_reason: str
    partial: bool
    steps: int
    resumed_from: int | None
    deployable: bool = False


# ------------------------------------------------------------------ what travels between stages


@dataclass
class JobPaths:
    """Where a job reads and writes."""

    teacher: Path
    dataset: Path
    test_dataset: Path | None
    out: Path
    work: Path
    cache: Path | None
    checkpoints: Path | None


@dataclass
class FittedData:
    """The transfer set as the teacher reads it, the task it serves, and its three splits.

    ``test`` is reported and never used to choose anything: a split of the transfer
    set (``test_source`` ``split``) or the caller's test set (``dataset``).
    """

    task: str
    transfer_set: TransferSet
    train: TransferSet
    validation: TransferSet
    test: TransferSet
    test_source: str
    #: Rows at the end of ``train`` mixed from pairs of its own (``method.mixup``), unlabelled.
    mixed_rows: int = 0


@dataclass
class TeacherTargets:
    """What the student learns from: the teacher's outputs on both splits."""

    #: (validation rows, output_dim), float32.
    validation: np.ndarray
    #: None when the teacher runs on every batch instead (``online``).
    train: np.ndarray | None
    train_features: np.ndarray | None
    #: ``logits``, ``probabilities`` or ``values``.
    output_kind: str
    hint_layer: str | None
    feature_dim: int | None
    online: bool

    @property
    def output_dim(self) -> int:
        """The width of one teacher output row."""
        return int(self.validation.shape[1])


@dataclass
class StudentDesign:
    """The student before training, the config that rebuilds it, and its loss."""

    student: nn.Module
    config: dict[str, Any]
    loss_fn: nn.Module
    has_labels: bool


@dataclass
class TrainedStudent:
    """The training result and the tensors it trained and validated on."""

    result: TrainResult
    data: TrainingData


#: How training may stop short and still export its best student: the report is partial.
PARTIAL_STOPS = ("time_budget", "cancelled")


class StageCancelled(Exception):
    """A cancellation that keeps the student, seen after training at a stage's check."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"cancelled during {stage}")
        self.stage = stage


@dataclass
class StopChecks:
    """Where the stages after training look for a cancellation that keeps the student.

    Only a cancellation not yet honoured counts: one that stopped training or the baseline
    was honoured there, and its student goes on to be exported and evaluated. A request
    to stop that does not keep the student (a worker handing its job back) does not cut
    these stages short: they end within seconds, and the job with them.
    """

    callbacks: Callbacks
    active: bool = True

    def check(self, stage: str) -> None:
        """Raise :class:`StageCancelled` for ``stage`` if the caller cancelled the run."""
        if not self.active or not self.callbacks.cancelled():
            return
        if self.callbacks.keeps_student_on_cancel():
            raise StageCancelled(stage)


#: Training rows the teacher runs on to fit the student's preprocessing when it runs online.
PREPROCESSING_SAMPLE_ROWS = 4096

#: Held-out rows the drop-in student is checked on against the torch student.
DROPIN_CHECK_ROWS = 64
#: The most held-out rows teacher and student files are compared on for ``parity``.
PARITY_ROWS = 10_000

# --------------------------------------------------------------------------- the run


def run(
    spec: DistillationSpec,
    *,
    teacher_path: str | Path,
    dataset_path: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    callbacks: Callbacks | None = None,
    test_dataset_path: str | Path | None = None,
    provenance: dict[str, Any] | None = None,
) -> RunResult:
    """Distil the teacher at ``teacher_path`` on the transfer set at ``dataset_path``.

    ``out_dir`` receives the artifacts. ``cache_dir`` makes the teacher-output
    cache reusable across runs; ``checkpoint_dir`` enables checkpoints and
    resumes from the latest one found there. ``test_dataset_path`` is a dataset
    reported on instead of a test split of the transfer set. ``provenance`` (e.g.
    ``{"job_id": ...}``) is copied into ``metrics.json``'s ``provenance`` and the card.
    """
    resolved_device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="distill-")) if work_dir is None else Path(work_dir)
    paths = JobPaths(
        teacher=Path(teacher_path),
        dataset=Path(dataset_path),
        test_dataset=Path(test_dataset_path) if test_dataset_path else None,
        out=out,
        work=work,
        cache=Path(cache_dir) if cache_dir else None,
        checkpoints=Path(checkpoint_dir) if checkpoint_dir else None,
    )
    try:
        return _distil(spec, paths, resolved_device, callbacks or Callbacks(), provenance or {})
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _distil(
    spec: DistillationSpec,
    paths: JobPaths,
    device: torch.device,
    callbacks: Callbacks,
    provenance: dict[str, Any],
) -> RunResult:
    """The stages of one job, in order."""
    torch.manual_seed(spec.training.seed)
    callbacks.event("stage", {"stage": "loading"})
    transfer_set = load_transfer_set(paths.dataset, spec.data)
    test_set = load_transfer_set(paths.test_dataset, spec.data) if paths.test_dataset else None
    teacher = load_teacher(paths.teacher, device=device, work_dir=paths.work / "teacher")
    data = _fit_transfer_set(spec, teacher, transfer_set, callbacks, test_set)
    targets = _teacher_targets(spec, teacher, data, device, paths.cache, callbacks)
    design = _design_student(spec, teacher, data, targets)
    _warn_if_from_scratch(spec, teacher, data, design, callbacks)
    climb = None
    if ladder.applies(spec, data.transfer_set.modality, targets.online, len(data.validation)):
        climb = _climb_ladder(spec, teacher, design, data, targets, device, paths, callbacks)
    if climb is not None:
        design, trained = climb.design, climb.trained
    else:
        trained = _train_student(
            spec, teacher, design, data, targets, device, paths.checkpoints, callbacks
        )
    cancelled_during = "training" if trained.result.stop_reason == "cancelled" else None
    baseline = _baseline_unless_cancelled(spec, design, data, targets, trained, device, callbacks)
    if cancelled_during is None and trained.result.stop_reason == "cancelled":
        cancelled_during = "baseline"
    # The export is never interrupted: each file it writes is whole, and a cancellation that
    # arrives meanwhile is seen once it is done.
    quantized = _export(
        spec,
        teacher,
        data,
        trained,
        paths.out,
        callbacks,
        exported=climb.exported if climb is not None else None,
    )
    stops = StopChecks(callbacks, active=cancelled_during is None)
    evaluated = False
    try:
        stops.check("export")
        metrics = _evaluate(
            spec,
            teacher,
            data,
            targets,
            trained,
            baseline,
            device,
            paths,
            callbacks,
            quantized,
            stops,
        )
        evaluated = True
    except StageCancelled as stopped:
        # Cancelled after training: the student is kept, unevaluated (nothing is half-reported).
        trained.result.stop_reason = "cancelled"
        cancelled_during = stopped.stage
        metrics = _unevaluated_metrics(spec, teacher, data, targets, trained, device, stopped.stage)
    metrics["cancelled_during"] = cancelled_during
    metrics["provenance"] = _provenance(spec, teacher, paths, device, provenance)
    metrics["ladder"] = climb.section if climb is not None else None
    metrics["deployed_file"] = _deployed_file(metrics)
    evaluation.validate_metrics(metrics)
    if evaluated:
        # The figures on the test rows, whole: with the ladder, the provenance and the
        # verdict on the file deployed, as metrics.json holds them.
        callbacks.event("evaluation", {"final": True, "metrics": metrics})
    artifacts = _write_reports(spec, teacher.signature, trained, metrics, paths.out)
    return _report(data.task, metrics, artifacts, trained.result)


def _deployed_file(metrics: dict[str, Any]) -> str:
    """The file the verdict is about: ``student.int8.onnx`` where the ladder chose a rung for
    its int8 file (the verdict becomes that file's, on the test rows), else ``student.onnx``.
    """
    section = metrics.get("ladder") or {}
    if section.get("chosen_precision") != "int8" or not metrics.get("evaluated"):
        return "student.onnx"
    entry = (metrics.get("quantized") or {}).get("int8")
    if entry is None or "verdict" not in entry:
        # The int8 file of the chosen rung could not be written again: the fp32 verdict stands.
        return "student.onnx"
    verdict = entry["verdict"]
    reason = (
        "judged on student.int8.onnx: the ladder chose this rung for its int8 file, which met "
        "the criteria on the validation rows where its fp32 file did not"
    )
    metrics["verdict"] = {**verdict, "reasons": [reason, *verdict["reasons"]]}
    return "student.int8.onnx"


def _baseline_unless_cancelled(
    spec: DistillationSpec,
    design: StudentDesign,
    data: FittedData,
    targets: TeacherTargets,
    trained: TrainedStudent,
    device: torch.device,
    callbacks: Callbacks,
) -> TrainResult | None:
    """The labels-only baseline, when asked or (``None``, the default) when there are labels;
    none once the run was cancelled, and none if it is cancelled while the baseline trains
    and the caller keeps the student on cancellation."""
    wants_baseline = spec.evaluation.baseline
    if not (wants_baseline or (wants_baseline is None and design.has_labels)):
        return None
    if trained.result.stop_reason == "cancelled":
        return None
    try:
        return _train_baseline(spec, design, data, targets, device, callbacks)
    except Cancelled:
        if not callbacks.keeps_student_on_cancel():
            raise
        # Cancelled while the baseline trained: the student is reported without it.
        trained.result.stop_reason = "cancelled"
        return None


# --------------------------------------------------------------------------- the transfer set


def _fit_transfer_set(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    transfer_set: TransferSet,
    callbacks: Callbacks,
    test_set: TransferSet | None = None,
) -> FittedData:
    """Tokenise text for the teacher, settle the task, check the fit, split off validation
    and test rows (none when the caller brings ``test_set``)."""
    signature = teacher.signature
    if transfer_set.modality == "text":
        transfer_set = _tokenize_for(teacher, transfer_set, spec.data.max_length, callbacks)
    if test_set is not None and test_set.modality == "text":
        test_set = _tokenize_for(teacher, test_set, spec.data.max_length, callbacks)
    task = resolve_task(spec, signature)
    facts = DataFacts(
        modality=transfer_set.modality,
        feature_shape=transfer_set.feature_shape,
        labelled_rows=transfer_set.labelled_rows,
        label_kind=transfer_set.label_kind,
        num_classes=transfer_set.num_classes,
    )
    check_fits(signature, facts)
    check_labels(task, spec, facts, signature.num_classes)
    if test_set is not None and test_set.feature_shape != transfer_set.feature_shape:
        raise TeacherIncompatible(
            f"the test set's features {test_set.feature_shape} are not the transfer set's "
            f"{transfer_set.feature_shape}",
            field="evaluation.test_dataset_id",
        )
    train_set, validation_set, test_split = split_three(
        transfer_set,
        spec.evaluation.validation_split,
        None if test_set is not None else spec.evaluation.test_split,
        spec.training.seed,
    )
    test = test_set if test_set is not None else test_split
    assert test is not None
    source = "dataset" if test_set is not None else "split"
    mixed = mixed_row_count(spec.method.mixup, train_set)
    train_set = with_mixed_rows(train_set, mixed, spec.training.seed)
    return FittedData(task, transfer_set, train_set, validation_set, test, source, mixed)


def _tokenize_for(
    teacher: TeacherRuntime, transfer_set: TransferSet, max_length: int, callbacks: Callbacks
) -> TransferSet:
    """The text set tokenised with the teacher's own tokenizer, within its position limit."""
    if teacher.tokenizer is None:
        raise TeacherIncompatible(
            "a text transfer set needs a teacher that ships its tokenizer", field="dataset_id"
        )
    limit = teacher.signature.extra.get("max_length")
    if isinstance(limit, int) and 0 < limit < max_length:
        # Past its position table the teacher cannot run at all.
        callbacks.event(
            "warning",
            {
                "code": "max_length_clamped",
                "message": f"data.max_length {max_length} is beyond the teacher's limit; "
                f"using {limit}",
            },
        )
        max_length = limit
    return tokenize(transfer_set, teacher.tokenizer, max_length)


def _labeled(labels: np.ndarray) -> np.ndarray:
    """Rows that carry a label: class id -1 (or NaN for targets) marks an unlabeled row."""
    if np.issubdtype(labels.dtype, np.integer):
        return labels >= 0
    return ~np.isnan(labels).reshape(len(labels), -1).any(axis=1)


def _train_labels(task: str, labels: np.ndarray) -> np.ndarray:
    if task == "classification":
        return labels.astype(np.int64)
    return labels.astype(np.float32)


# --------------------------------------------------------------------------- teacher targets


def looks_like_probabilities(outputs: np.ndarray, atol: float = 1e-3) -> bool:
    """Rows that are non-negative and sum to 1: a classifier's probabilities, not logits."""
    if outputs.ndim != 2 or outputs.shape[1] < 2 or not len(outputs):
        return False
    return bool((outputs >= 0).all() and np.allclose(outputs.sum(1), 1.0, atol=atol))


def _teacher_targets(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    device: torch.device,
    cache_dir: Path | None,
    callbacks: Callbacks,
) -> TeacherTargets:
    """The teacher's outputs on both splits (train only when cached) and its hint layer."""
    declared_kind = teacher.signature.output_kind
    declared_kind = declared_kind or ("logits" if data.task == "classification" else "values")
    limits = TeacherPassLimits.within(spec.training.max_minutes, callbacks)
    online = spec.method.teacher_outputs == "online"
    # A teacher that never returns is cut off by the time budget or a cancellation.
    with teacher.stoppable(limits.stop_reason):
        prepare = getattr(teacher, "prepare", None)
        if prepare is not None:
            prepare(to_tensors({k: v[:64] for k, v in data.train.arrays.items()}, device))
        hint_layer = _hint_layer(spec, data.task, teacher)
        callbacks.event("stage", {"stage": "teacher_outputs"})
        validation, train_outputs, train_features = _teacher_outputs(
            spec, teacher, data, hint_layer, online, cache_dir, callbacks, limits
        )
    output_kind = _read_output_kind(data.task, declared_kind, validation, callbacks)
    feature_dim = None
    if hint_layer is not None:
        probe = to_tensors({k: v[:2] for k, v in data.train.arrays.items()}, device)
        feature_dim = int(teacher.predict_with_features(probe, hint_layer)[1].shape[1])
    return TeacherTargets(
        validation=validation,
        train=train_outputs,
        train_features=train_features,
        output_kind=output_kind,
        hint_layer=hint_layer,
        feature_dim=feature_dim,
        online=online,
    )


def _hint_layer(spec: DistillationSpec, task: str, teacher: TeacherRuntime) -> str | None:
    """The teacher layer a hint loss matches: the spec's, else the teacher's first candidate."""
    method = spec.method_for(task)
    if method != "hint" and not any(t.name == "hint" for t in spec.method.extra_terms):
        return None
    candidates = teacher.hint_layers()
    hint_layer = spec.method.hint_layer or (candidates[0] if candidates else None)
    if hint_layer is None:
        raise TeacherIncompatible(
            "hint needs an intermediate teacher layer and none was found; name one",
            field="method.hint_layer",
        )
    return hint_layer


def _teacher_outputs(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    hint_layer: str | None,
    online: bool,
    cache_dir: Path | None,
    callbacks: Callbacks,
    limits: TeacherPassLimits,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(validation outputs, train outputs, train features); train ones only when not online."""
    # The teacher runs once over the transfer set; the cache key covers what it saw.
    preparation = {
        "data": spec.data.model_dump(),
        "split": [spec.evaluation.validation_split, data.test_source, spec.training.seed]
        + ([spec.evaluation.test_split] if data.test_source == "split" else []),
        "mixed_rows": data.mixed_rows,
    }

    def outputs_of(
        part: str, subset: TransferSet, hint: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return cached_teacher_outputs(
            teacher,
            subset.arrays,
            key=cache_key(teacher.digest, data.transfer_set.digest, {**preparation, "part": part}),
            cache_dir=cache_dir,
            batch_size=pass_batch_size(spec.training),
            hint_layer=hint,
            callbacks=callbacks,
            limits=limits,
        )

    validation, _ = outputs_of("val", data.validation)
    train_outputs: np.ndarray | None = None
    train_features: np.ndarray | None = None
    if not online:
        train_outputs, train_features = outputs_of("train", data.train, hint_layer)
    return validation.reshape(len(validation), -1), train_outputs, train_features


def _read_output_kind(
    task: str, output_kind: str, validation: np.ndarray, callbacks: Callbacks
) -> str:
    """``probabilities`` for a classifier whose logits are in fact probabilities, with a warning."""
    if not (task == "classification" and output_kind == "logits"):
        return output_kind
    if not looks_like_probabilities(validation):
        return output_kind
    # The graph hides its softmax (e.g. written out as exp / sum): softmaxing
    # these again would flatten every soft target towards uniform.
    callbacks.event(
        "warning",
        {
            "code": "teacher_outputs_probabilities",
            "message": "the teacher's outputs are probabilities (non-negative, rows sum "
            "to 1); they are taken in log space",
        },
    )
    return "probabilities"


# --------------------------------------------------------------------------- the student


def _warn_if_from_scratch(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    design: StudentDesign,
    callbacks: Callbacks,
) -> None:
    """A warning when a transformers teacher's student could not start from its layers.

    The budget left no room for a student of the teacher's width, nor for a narrower one
    cut from its layers (:mod:`~worker.engine.hf.pruning`): this one starts
    from random weights, which a transfer set of thousands of rows rarely trains to
    the teacher's quality. The warning names the largest compression that would
    keep the teacher's layers; where the spec asked for the width or heads, it names
    instead what a width must be to be cut from the teacher.
    """
    if not (
        design.config.get("architecture") == "hf_encoder"
        and spec.student.init_from_teacher
        and design.config.get("initialised_from_teacher_layers") is None
    ):
        return
    largest = _largest_compression_from_teacher(teacher, data)
    if largest is None:
        return
    if spec.student.hidden_size is not None or spec.student.num_heads is not None:
        callbacks.event("warning", _asked_shape_from_scratch(spec, teacher, design))
        return
    callbacks.event(
        "warning",
        {
            "code": "student_from_scratch",
            "field": (
                "student.max_parameters"
                if spec.student.max_parameters is not None
                else "student.compression"
            ),
            "message": "no student that starts from the teacher's layers (at its width, or "
            "cut to its most important heads and channels) fits this budget, so the student "
            "starts from random weights; "
            f"a compression of at most {largest:.1f} keeps the teacher's layers",
            "largest_compression_from_teacher": largest,
        },
    )


def _asked_shape_from_scratch(
    spec: DistillationSpec, teacher: TeacherRuntime, design: StudentDesign
) -> dict[str, Any]:
    """The ``student_from_scratch`` warning of a student whose width or heads the spec asked
    for: what a width cut from the teacher must be, or that this family's cannot be."""
    from worker.engine.hf.families import make_config
    from worker.engine.hf.sizing import cuttable
    from worker.engine.hf.wrapper import HFEncoder

    module = getattr(teacher, "module", None)
    assert isinstance(module, HFEncoder)  # _largest_compression_from_teacher found one
    config = module.hf_config
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    # The family's config reads its own names (DistilBERT's dim, n_heads) as these.
    asked = make_config(design.config["hf_config"])
    shape = f"{asked.hidden_size} wide with {asked.num_attention_heads} heads"
    if cuttable(config):
        need = (
            f"a student cut from the teacher's layers is narrower than its {width} channels "
            f"by whole heads of its {width // heads}: a multiple of {width // heads} below "
            f"{width}, with as many heads as that width holds of them"
        )
    else:
        need = f"a narrower student of a {config.model_type} teacher cannot be cut from its layers"
    return {
        "code": "student_from_scratch",
        "field": "student.hidden_size"
        if spec.student.hidden_size is not None
        else "student.num_heads",
        "message": f"the student asked for ({shape}) starts from random weights: {need}",
    }


def _largest_compression_from_teacher(teacher: TeacherRuntime, data: FittedData) -> float | None:
    """The largest compression at which a transformers teacher's student still starts from its
    layers (:func:`~worker.engine.hf.sizing.largest_compression_from_teacher`); None for any
    other teacher."""
    from worker.engine.hf.sizing import largest_compression_from_teacher
    from worker.engine.hf.student import dense_parameters
    from worker.engine.hf.wrapper import HFEncoder

    module = getattr(teacher, "module", None)
    if not isinstance(module, HFEncoder):
        return None
    counts = _token_counts(data.train)
    return largest_compression_from_teacher(
        module.hf_config,
        module.head,
        teacher.signature.parameters,
        sum(parameter.numel() for parameter in module.dense.parameters()),
        int((counts > 0).sum()) if counts is not None else 0,
        lambda width: dense_parameters(module, width),
    )


def _design_student(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    targets: TeacherTargets,
    student_spec: StudentSpec | None = None,
) -> StudentDesign:
    """The student the spec asks for, sized against the teacher, and the loss it trains with.

    ``student_spec`` stands in for ``spec.student`` (a rung of the student ladder).
    """
    signature = teacher.signature
    first_input = next(iter(data.transfer_set.arrays.values()))
    context = StudentContext(
        task=data.task,
        modality=data.transfer_set.modality,
        input_shape=tuple(first_input.shape[1:]),
        input_names=list(data.transfer_set.arrays),
        output_dim=targets.output_dim,
        teacher_parameters=signature.parameters,
        teacher_bytes=signature.bytes,
        vocab_size=len(teacher.tokenizer) if teacher.tokenizer is not None else None,
        teacher=teacher,
        token_counts=_token_counts(data.train),
        sample_inputs=data.train.arrays if data.train.modality == "text" else None,
    )
    preprocessing = fit_preprocessing(
        data.task, data.train.arrays, _train_teacher_outputs(teacher, data, targets)
    )
    student = wrap_student(build_student(student_spec or spec.student, context), preprocessing)
    labels = data.train.labels
    has_labels = labels is not None and bool(_labeled(labels).any())
    loss_fn = build_loss(
        spec,
        data.task,
        targets.output_kind,
        has_labels,
        int(student.feature_dim),  # type: ignore[arg-type]
        targets.feature_dim,
    )
    config = dict(student.config)  # type: ignore[arg-type]
    return StudentDesign(student, config, standardised_loss(loss_fn, student), has_labels)


def _token_counts(train: TransferSet) -> np.ndarray | None:
    """How often the training rows use each token id (padding left out); None without text."""
    ids = train.arrays.get("input_ids")
    if ids is None or train.modality != "text":
        return None
    mask = train.arrays.get("attention_mask")
    used = ids[mask > 0] if mask is not None else ids.ravel()
    return np.bincount(used.astype(np.int64)).astype(np.int64)


def _train_teacher_outputs(
    teacher: TeacherRuntime, data: FittedData, targets: TeacherTargets
) -> np.ndarray:
    """The teacher's outputs on training rows: cached ones, or a sample's when run online."""
    if targets.train is not None:
        return targets.train
    sample = {name: array[:PREPROCESSING_SAMPLE_ROWS] for name, array in data.train.arrays.items()}
    outputs, _ = compute_teacher_outputs(teacher, sample, batch_size=256)
    return outputs.reshape(len(outputs), -1)


# --------------------------------------------------------------------------- training


def _train_student(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    design: StudentDesign,
    data: FittedData,
    targets: TeacherTargets,
    device: torch.device,
    checkpoint_dir: Path | None,
    callbacks: Callbacks,
) -> TrainedStudent:
    """Train the student on the teacher's targets (and the labels, where the loss uses them)."""
    callbacks.event(
        "stage",
        {
            "stage": "training",
            "student": design.config.get("architecture"),
            "student_parameters": count_parameters(design.student),
            "teacher_backend": teacher.backend,
        },
    )
    training_data = _training_data(design, data, targets, teacher)
    keep_on_device_if_small(training_data, device)
    plan = plan_for_data(
        spec.training, training_data, design.student, device, loss_fn=design.loss_fn
    )
    for warning in plan.warnings:
        callbacks.event("warning", warning.to_dict())
    result = train(
        student=design.student,
        loss_fn=design.loss_fn,
        data=training_data,
        spec=spec.training,
        task=data.task,
        teacher_output_kind=targets.output_kind,
        device=device,
        callbacks=callbacks,
        checkpoint_dir=checkpoint_dir,
        plan=plan,
    )
    return TrainedStudent(result, training_data)


def _training_data(
    design: StudentDesign, data: FittedData, targets: TeacherTargets, teacher: TeacherRuntime
) -> TrainingData:
    """The splits as CPU tensors, with the teacher's targets, or the teacher itself online."""
    cpu = torch.device("cpu")
    labels = data.train.labels
    train_labels = (
        torch.from_numpy(_train_labels(data.task, labels))
        if design.has_labels and labels is not None
        else None
    )
    train_outputs = targets.train
    return TrainingData(
        train=to_tensors(data.train.arrays, cpu),
        train_teacher=(
            torch.from_numpy(train_outputs.reshape(len(train_outputs), -1))
            if train_outputs is not None
            else None
        ),
        train_labels=train_labels,
        val=to_tensors(data.validation.arrays, cpu),
        val_teacher=torch.from_numpy(targets.validation),
        train_features=(
            torch.from_numpy(targets.train_features) if targets.train_features is not None else None
        ),
        online_teacher=teacher if targets.online else None,
        hint_layer=targets.hint_layer if targets.online else None,
    )


def _train_baseline(
    spec: DistillationSpec,
    design: StudentDesign,
    data: FittedData,
    targets: TeacherTargets,
    device: torch.device,
    callbacks: Callbacks,
) -> TrainResult:
    """The same student, freshly initialised, trained on the labeled rows alone."""
    callbacks.event("stage", {"stage": "baseline"})
    task = data.task
    assert data.train.labels is not None
    labeled = data.train.subset(np.flatnonzero(_labeled(data.train.labels)))
    assert labeled.labels is not None
    validation = data.validation
    validation_rows = (
        np.flatnonzero(_labeled(validation.labels))
        if validation.labels is not None
        else np.array([], int)
    )
    torch.manual_seed(spec.training.seed)
    student = rebuild_student(design.config)
    # Without labeled validation rows, select on the training labels instead.
    selection = validation.subset(validation_rows) if len(validation_rows) else labeled
    assert selection.labels is not None
    cpu = torch.device("cpu")
    training_data = TrainingData(
        train=to_tensors(labeled.arrays, cpu),
        train_teacher=None,
        train_labels=torch.from_numpy(_train_labels(task, labeled.labels)),
        val=to_tensors(selection.arrays, cpu),
        val_teacher=_reference_targets(task, selection.labels, targets.output_dim),
    )
    keep_on_device_if_small(training_data, device)
    return train(
        student=student,
        loss_fn=standardised_loss(LabelsOnlyLoss(task), student),
        data=training_data,
        spec=spec.training,
        task="classification" if task == "classification" else "regression",
        # The labels as one-hot rows: probabilities, for the validation divergence.
        teacher_output_kind="probabilities",
        device=device,
        # Its evaluations are logged apart from the student's; a cancellation stops it too.
        callbacks=Callbacks(
            on_event=lambda kind, d: callbacks.event(f"baseline_{kind}", d),
            should_cancel=callbacks.cancelled,
        ),
        use_teacher=False,
    )


def _reference_targets(task: str, labels: np.ndarray, output_dim: int) -> torch.Tensor:
    """Labels shaped like teacher outputs, so validation can score a labels-only student."""
    if task == "classification":
        return nn.functional.one_hot(torch.from_numpy(labels), output_dim).float()
    return torch.from_numpy(labels.astype(np.float32).reshape(len(labels), -1))


# --------------------------------------------------------------------------- the student ladder


@dataclass
class LadderClimb:
    """The rung the ladder chose (its design and training) and ``metrics.json``'s ``ladder``."""

    design: StudentDesign
    trained: TrainedStudent
    section: dict[str, Any]
    #: The chosen rung's ``student.onnx``, exported (a drop-in where the teacher is ONNX)
    #: when it was measured: the job's own is a copy.
    exported: Path | None = None


def _accept(spec: DistillationSpec) -> dict[str, Any]:
    """``evaluation.accept`` with ``student.max_latency_ms`` folded in (the tighter bound wins)."""
    accept = spec.evaluation.accept.model_dump()
    bound = spec.student.max_latency_ms
    if bound is not None:
        given = accept.get("max_latency_ms")
        accept["max_latency_ms"] = bound if given is None else min(float(given), bound)
    return accept


def _climb_ladder(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    top: StudentDesign,
    data: FittedData,
    targets: TeacherTargets,
    device: torch.device,
    paths: JobPaths,
    callbacks: Callbacks,
) -> LadderClimb | None:
    """Train students from tiny up to ``top`` (the one ``auto`` designs), smallest first, and
    keep the first that meets the criteria on the validation rows (see
    :mod:`worker.engine.ladder`).

    None when ``top`` is too narrow to leave a smaller rung: the job trains ``top`` alone.
    """
    architecture = str(top.config.get("architecture"))
    planned = _rung_designs(spec, teacher, data, targets, top)
    if planned is None:
        return None
    knob, designs = planned
    started = time.monotonic()
    callbacks.event(
        "stage",
        {
            "stage": "training",
            "student": architecture,
            "student_parameters": count_parameters(top.student),
            "teacher_backend": teacher.backend,
            "ladder": [ladder.rung_size(design.config, knob) for design in designs],
        },
    )
    judge = _RungJudge(spec, teacher, data, targets, device, paths.work / "ladder", knob)
    rungs: list[dict[str, Any]] = []
    trained_rungs: list[TrainedStudent] = []
    stopped = "all_rungs"
    for index, design in enumerate(designs):
        remaining = spec.training.max_minutes - (time.monotonic() - started) / 60.0
        if remaining <= 0:
            stopped = "time_budget"
            break
        rung_started = time.monotonic()
        is_top = index == len(designs) - 1
        minutes = remaining if is_top else ladder.rung_minutes(remaining, len(designs) - index)
        try:
            if rungs:
                # Cancelled while the last rung was judged: it is kept, no new rung starts.
                StopChecks(callbacks).check("training")
            trained = _train_rung(
                spec, teacher, designs, index, data, targets, device, paths, callbacks, minutes
            )
        except (StageCancelled, Cancelled):
            if not rungs or not callbacks.keeps_student_on_cancel():
                raise
            # Cancelled before this rung validated once: the climb keeps what it has.
            stopped = "cancelled"
            break
        rung = judge.measure(index, design, trained)
        rung.update(
            steps=trained.result.steps,
            stop_reason=trained.result.stop_reason,
            training_seconds=round(trained.result.seconds, 3),
            seconds=round(time.monotonic() - rung_started, 3),
        )
        rungs.append(rung)
        trained_rungs.append(trained)
        callbacks.event("ladder_rung", {"rung": index, "rungs": len(designs), **rung})
        if trained.result.stop_reason == "cancelled":
            stopped = "cancelled"  # the caller keeps what the climb has so far
            break
        if ladder.met(rung):
            stopped = "met_criteria"
            break
    if not rungs:
        return None
    chosen = ladder.choose(data.task, rungs)
    precision = ladder.precision(rungs[chosen])
    # The job resumed where any rung took up a checkpoint: it says so whichever rung is kept.
    resumed = next((t.result.resumed_from for t in trained_rungs if t.result.resumed_from), None)
    kept = trained_rungs[chosen]
    if resumed is not None and kept.result.resumed_from is None:
        kept = TrainedStudent(replace(kept.result, resumed_from=resumed), kept.data)
    if stopped == "cancelled":
        kept = TrainedStudent(replace(kept.result, stop_reason="cancelled"), kept.data)
    section = {
        "rungs": rungs,
        "chosen": chosen,
        "basis": "validation",
        "met_criteria": ladder.met(rungs[chosen]),
        "chosen_precision": precision,
        "knob": knob,
        "planned": [ladder.rung_size(design.config, knob) for design in designs],
        "stopped": stopped,
        "seconds": round(time.monotonic() - started, 3),
        "teacher": judge.teacher_figures(),
        "criteria": judge.accept,
    }
    if not section["met_criteria"]:
        callbacks.event(
            "warning",
            {
                "code": "ladder_criteria_unmet",
                "message": "no rung of the student ladder met the criteria on the evidence of "
                "the validation rows (each one met, none left unsettled); kept the one with "
                f"the best fidelity ({knob} {rungs[chosen][knob]})",
            },
        )
    return LadderClimb(
        designs[chosen], kept, section, exported=judge.folder / f"rung-{chosen}" / "student.onnx"
    )


def _rung_designs(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    targets: TeacherTargets,
    top: StudentDesign,
) -> tuple[str, list[StudentDesign]] | None:
    """(what the rungs differ in, their students smallest first, ``top`` last), or None when
    ``top`` leaves no smaller rung: the job trains it alone.

    An MLP's or a CNN's rungs are geometric widths below its own
    (:func:`~worker.engine.ladder.rung_widths`); a transformers student's are the students
    ``auto`` designs at geometric compressions up to the largest at which one still starts
    from the teacher's layers (:func:`~worker.engine.ladder.rung_compressions`), each
    smaller than the one above it. A top that does not start from the teacher's layers
    itself gets no ladder.
    """
    architecture = str(top.config.get("architecture"))
    knob = ladder.RUNG_KNOB.get(architecture)
    if knob == "encoder":
        if top.config.get("initialised_from_teacher_layers") is None:
            return None
        largest = _largest_compression_from_teacher(teacher, data)
        if largest is None:
            return None
        parameters = teacher.signature.parameters
        budget = spec.student.max_parameters
        asked = parameters / budget if budget is not None else spec.student.compression
        if asked is None:
            return None
        updates: list[dict[str, Any]] = [
            {"compression": compression, "max_parameters": None}
            for compression in ladder.rung_compressions(asked, largest)[:-1]
        ]
    else:
        width = ladder.top_width(top.config)
        if knob is None or width is None:
            return None
        layers = len(top.config[knob])
        updates = [
            {knob: ladder.rung_sizes(architecture, w, layers)}
            for w in ladder.rung_widths(width, smallest=ladder.SMALLEST_WIDTH[architecture])
            if w != width
        ]
    designs = [_rung_design(spec, teacher, data, targets, update) for update in updates]
    designs = [*designs, top]
    if knob == "encoder":
        # Only rungs that start from the teacher, each smaller than the next.
        sizes = [count_parameters(design.student) for design in designs]
        designs = [
            design
            for design, size, above in zip(designs, sizes, [*sizes[1:], math.inf], strict=True)
            if design.config.get("initialised_from_teacher_layers") is not None and size < above
        ]
    return (knob, designs) if len(designs) >= 2 else None


def _rung_design(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    targets: TeacherTargets,
    update: dict[str, Any],
) -> StudentDesign:
    """The rung whose student spec is the job's with ``update`` (a size, a compression)."""
    # Seeded per rung: a rung starts the same way whichever rungs came before it.
    torch.manual_seed(spec.training.seed)
    rung_spec = spec.student.model_copy(update=update)
    return _design_student(spec, teacher, data, targets, rung_spec)


def _train_rung(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    designs: list[StudentDesign],
    index: int,
    data: FittedData,
    targets: TeacherTargets,
    device: torch.device,
    paths: JobPaths,
    callbacks: Callbacks,
    minutes: float,
) -> TrainedStudent:
    """One rung on its share of the time budget, with its own (lower, below the top) floor.

    Rungs share the job's checkpoint folder: a checkpoint of this rung resumes it, one of a
    later rung is left alone (this rung trains without checkpoints: it is retrained the same
    way), one of an earlier rung is not resumed.
    """
    design = designs[index]
    is_top = index == len(designs) - 1
    training = spec.training.model_copy(update={"max_minutes": minutes})
    training_data = _training_data(design, data, targets, teacher)
    keep_on_device_if_small(training_data, device)
    parameters = count_parameters(design.student)
    plan = plan_for_data(
        training,
        training_data,
        design.student,
        device,
        min_steps=ladder.rung_min_steps(parameters, is_top),
        loss_fn=design.loss_fn,
    )
    for warning in plan.warnings:
        callbacks.event("warning", {**warning.to_dict(), "rung": index})
    owner = _checkpoint_rung(paths.checkpoints, designs)
    checkpoint_dir = paths.checkpoints if owner is None or owner <= index else None

    def progress(row: dict[str, Any]) -> None:
        callbacks.progress({**row, "rung": index})

    result = train(
        student=design.student,
        loss_fn=design.loss_fn,
        data=training_data,
        spec=training,
        task=data.task,
        teacher_output_kind=targets.output_kind,
        device=device,
        callbacks=Callbacks(progress, callbacks.on_event, callbacks.should_cancel),
        checkpoint_dir=checkpoint_dir,
        resume=owner == index,
        plan=plan,
    )
    return TrainedStudent(result, training_data)


def _checkpoint_rung(checkpoint_dir: Path | None, designs: list[StudentDesign]) -> int | None:
    """The rung whose weights the latest checkpoint in ``checkpoint_dir`` holds, if any."""
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is None:
        return None
    from safetensors import safe_open

    with safe_open(str(checkpoint / "student.safetensors"), framework="pt") as weights:
        names: list[str] = weights.keys()
        shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in names}
    for index, design in enumerate(designs):
        state = design.student.state_dict()
        if shapes == {key: tuple(value.shape) for key, value in state.items()}:
            return index
    return None


class _RungJudge:
    """A trained rung measured on the VALIDATION rows and held to the acceptance criteria.

    Figures as the verdict reads them, from the rung's exported file in onnxruntime (a
    drop-in, as the job's ``student.onnx`` will be, where the teacher is an ONNX file):
    the task metric against the teacher's, fidelity to the teacher's cached outputs,
    batch-1 latency (onnxruntime where the teacher runs there too, else torch, as the
    verdict compares them), parameters and bytes. A rung meets the criteria only where
    the validation rows settle each one (:func:`_settled`).
    """

    def __init__(
        self,
        spec: DistillationSpec,
        teacher: TeacherRuntime,
        data: FittedData,
        targets: TeacherTargets,
        device: torch.device,
        folder: Path,
        knob: str,
    ) -> None:
        self.task, self.teacher, self.data, self.targets = data.task, teacher, data, targets
        self.device, self.folder, self.knob = device, folder, knob
        self.accept = _accept(spec)
        self.seed = spec.training.seed
        teacher_file = _teacher_onnx_file(teacher)
        self.teacher_file = teacher_file
        # The int8 file of each rung is judged too where the job asks for one and the
        # teacher runs in onnxruntime, the only runtime an int8 file's latency compares in.
        self.int8 = "int8" in spec.export.quantize and teacher_file is not None
        self.metric = ACCEPT_METRIC[data.task]
        self.fidelity_name = ladder.RANKING_FIDELITY[data.task]
        validation = data.validation
        self.reference = _reference(data.task, validation.labels, targets.validation)
        rows = self.reference.rows
        self.teacher_metrics = evaluation.task_metrics(
            data.task, targets.validation[rows], self.reference.values
        )
        first = to_tensors({k: v[:1] for k, v in validation.arrays.items()}, torch.device("cpu"))
        self.inputs = evaluation.first_row(first, device)
        self.runtime = "onnxruntime" if teacher_file is not None else "torch"
        if teacher_file is not None:
            self.teacher_latency = teacher_file.latency_ms(validation.arrays)
        else:
            self.teacher_latency = evaluation.measure_latency(teacher.predict, self.inputs, device)

    def teacher_figures(self) -> dict[str, Any]:
        """The teacher's side of every rung's comparison."""
        return {
            "metric": {"name": self.metric, "value": self.teacher_metrics.get(self.metric)},
            "latency_ms": self.teacher_latency,
            "latency_runtime": self.runtime,
            "parameters": self.teacher.signature.parameters,
            "bytes": self.teacher.signature.bytes,
        }

    def measure(self, index: int, design: StudentDesign, trained: TrainedStudent) -> dict[str, Any]:
        """The rung's figures, whether it met the criteria, and every criterion's reason."""
        student = trained.result.student.cpu().eval()
        folder = self.folder / f"rung-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "student.onnx"
        example = {name: value[:2].cpu() for name, value in trained.data.val.items()}
        export.export_onnx(student, example, path)
        teacher_graph = _teacher_graph(self.teacher)
        if teacher_graph is not None:
            _export_dropin(teacher_graph, self.teacher.signature, student, self.data, path)
        onnx_file = OnnxFile(path, output=_student_output(path, self.teacher))
        metrics, fidelity, intervals = self._score(onnx_file)
        teacher_latency, onnx_latency = self._latencies(onnx_file)
        rows = self.reference.rows
        student.to(self.device)
        latency = onnx_latency
        if self.runtime == "torch":
            # Timed in turn with the teacher, as a file is where the teacher runs in onnxruntime.
            teacher_latency, latency = evaluation.paired_torch_latency_ms(
                [self.teacher.predict, lambda b: student(**b)], self.inputs, self.device
            )
        figures = self._figures(
            metrics, fidelity, intervals, latency, student, teacher_latency=teacher_latency
        )
        verdict = evaluation.decide(self.task, figures, self.accept)
        file_bytes = path.stat().st_size
        external = path.with_name(path.name + ".data")
        if external.exists():
            file_bytes += external.stat().st_size
        return {
            self.knob: ladder.rung_size(design.config, self.knob),
            "parameters": figures["student"]["parameters"],
            "bytes": figures["student"]["bytes"],
            "file_bytes": file_bytes,
            "onnxruntime_latency_ms": onnx_latency,
            "latency_ms": latency,
            "latency_runtime": self.runtime,
            "speedup": figures["speedup"],
            "compression": figures["compression"],
            "validation": {
                "rows": len(rows),
                "reference": self.reference.name,
                "metric": {
                    "name": self.metric,
                    "value": metrics.get(self.metric),
                    "teacher": self.teacher_metrics.get(self.metric),
                },
                "fidelity": {"name": self.fidelity_name, "value": fidelity[self.fidelity_name]},
                "fidelity_all": fidelity,
            },
            "met_criteria": _settled(verdict),
            "reasons": verdict["reasons"],
            "caveats": verdict["caveats"],
            **({"int8": self._int8(path, student)} if self.int8 else {}),
        }

    def _score(self, onnx_file: OnnxFile) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Task metrics, fidelity and their 95% intervals of ``onnx_file`` on the
        validation rows."""
        outputs = onnx_file.predict(self.data.validation.arrays)
        kind = "values"
        if self.task == "classification":
            kind = "probabilities" if looks_like_probabilities(outputs) else "logits"
        rows = self.reference.rows
        metrics = evaluation.task_metrics(self.task, outputs[rows], self.reference.values)
        fidelity = evaluation.fidelity(
            outputs, self.targets.validation, self.task, self.targets.output_kind, kind
        )
        intervals = {
            "student": evaluation.task_metric_interval(
                self.task, outputs[rows], self.reference.values, seed=self.seed
            ),
            "fidelity": evaluation.fidelity_interval(
                self.task,
                outputs,
                self.targets.validation,
                (kind, self.targets.output_kind or "logits"),
                seed=self.seed,
            ),
        }
        return metrics, fidelity, intervals

    def _int8(self, fp32: Path, student: nn.Module) -> dict[str, Any] | None:
        """The rung's int8 file judged like the rung: its parameters are the fp32 student's,
        its bytes its own weights' (so compression by bytes counts them, as
        :func:`~worker.engine.evaluation.schema.quantized_view` does on the test rows);
        None where it could not be quantized."""
        rows = {k: v[: export.CALIBRATION_ROWS] for k, v in self.data.train.arrays.items()}
        try:
            quantized = export.quantize_int8(fp32, rows)
        except ExportFailed:
            return None  # the job's own int8 export says why, if it fails there too
        onnx_file = OnnxFile(quantized.path, output=_student_output(quantized.path, self.teacher))
        metrics, fidelity, intervals = self._score(onnx_file)
        teacher_latency, latency = self._latencies(onnx_file)
        figures = self._figures(
            metrics,
            fidelity,
            intervals,
            latency,
            student,
            quantized.weight_bytes,
            teacher_latency=teacher_latency,
        )
        verdict = evaluation.decide(self.task, figures, self.accept)
        return {
            "file_bytes": quantized.file_bytes,
            "bytes": quantized.weight_bytes,
            "method": quantized.method,
            "onnxruntime_latency_ms": latency,
            "speedup": figures["speedup"],
            "compression": figures["compression"],
            "validation": {
                "metric": {"name": self.metric, "value": metrics.get(self.metric)},
                "fidelity": {"name": self.fidelity_name, "value": fidelity[self.fidelity_name]},
            },
            "met_criteria": _settled(verdict),
            "reasons": verdict["reasons"],
            "caveats": verdict["caveats"],
        }

    def _latencies(self, onnx_file: OnnxFile) -> tuple[float, float]:
        """(teacher, ``onnx_file``) batch-1 ms in onnxruntime, timed in turn where the teacher
        runs there (else the teacher's figure from the start of the climb)."""
        arrays = self.data.validation.arrays
        if self.teacher_file is None:
            return self.teacher_latency, onnx_file.latency_ms(arrays)
        teacher_ms, student_ms = evaluation.paired_latency_ms(
            [self.teacher_file, onnx_file], arrays
        )
        return teacher_ms, student_ms

    def _figures(
        self,
        metrics: dict[str, Any],
        fidelity: dict[str, Any],
        intervals: dict[str, Any],
        latency: float,
        student: nn.Module,
        size: int | None = None,
        *,
        teacher_latency: float,
    ) -> dict[str, Any]:
        """The figures :func:`evaluation.decide` reads, for the rung on the validation rows
        (with the intervals its caveats are drawn from);
        ``size`` is the bytes of the file judged where they are not the student's state
        dict's (an int8 file's weights); ``teacher_latency`` the teacher's, timed beside it."""
        signature = self.teacher.signature
        parameters = count_parameters(student)
        size = evaluation.module_bytes(student) if size is None else size
        by_parameters = signature.parameters > 0 and parameters > 0
        compression = (
            signature.parameters / parameters
            if by_parameters
            else signature.bytes / size
            if signature.bytes > 0 and size > 0
            else None
        )
        speedup = teacher_latency / latency if latency > 0 else None
        return {
            "teacher": {**self.teacher_metrics, "latency_ms": teacher_latency},
            "student": {
                **metrics,
                "latency_ms": latency,
                "parameters": parameters,
                "bytes": size,
            },
            "fidelity": fidelity,
            "speedup": speedup if speedup is None or math.isfinite(speedup) else None,
            "compression": compression,
            "compression_basis": "parameters" if by_parameters else "bytes",
            "intervals": intervals,
            "split": {
                "reference": self.reference.name,
                "scored_rows": len(self.reference.rows),
                "scored_on": "validation",
            },
        }


def _settled(verdict: Mapping[str, Any]) -> bool:
    """Whether a rung met the criteria on the evidence: every one met, and none that the
    validation rows cannot settle (its threshold inside its figure's 95% interval, a
    caveat). A rung that meets them by a row or two can miss them on new rows; the
    climb goes on to the next one."""
    return bool(verdict["deployable"]) and not verdict.get("caveats")


def _teacher_onnx_file(teacher: TeacherRuntime) -> OnnxFile | None:
    """The teacher's own ONNX file in onnxruntime, as :func:`_teacher_on_test` runs it."""
    graph_path = getattr(teacher, "graph_path", None)
    if graph_path is None:
        return None
    zipmap = teacher.signature.extra.get("zipmap")
    output = zipmap["tensor"] if zipmap else teacher.signature.output
    try:
        return OnnxFile(graph_path, output=output)
    except Exception:  # onnxruntime raises its own exception types
        return None


# --------------------------------------------------------------------------- evaluation


@dataclass
class Reference:
    """What the task metrics compare against on the test rows."""

    #: Test rows that are scored.
    rows: np.ndarray
    values: np.ndarray
    #: ``labels`` or ``teacher``.
    name: str


@dataclass
class ScoredSide:
    """One model's outputs on the test rows, and how they were computed."""

    outputs: np.ndarray
    #: ``onnxruntime`` (the exported file) or ``torch``.
    runtime: str
    #: ``logits``, ``probabilities`` or ``values``: how to read ``outputs``.
    kind: str
    onnx: OnnxFile | None = None


def _evaluate(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    targets: TeacherTargets,
    trained: TrainedStudent,
    baseline: TrainResult | None,
    device: torch.device,
    paths: JobPaths,
    callbacks: Callbacks,
    quantized: dict[str, Quantized | None] | None = None,
    stops: StopChecks | None = None,
) -> dict[str, Any]:
    """Teacher, student (and baseline) on the test rows, against the same reference, and the
    parity of the teacher's and student's files.

    Each quantized student of ``quantized`` (None where its quantization failed) is
    scored beside the student, by the same harness, under ``quantized``. ``stops`` is
    checked between the parts, and last before the figures are reported: a cancellation
    raises :class:`StageCancelled` and no figure of the evaluation is kept.
    """
    stops = stops or StopChecks(callbacks, active=False)

    def check() -> None:
        stops.check("evaluation")

    callbacks.event("stage", {"stage": "evaluation"})
    task, result, test = data.task, trained.result, data.test
    inputs = to_tensors(test.arrays, torch.device("cpu"))
    result.student.to(device)  # the export stage moved it to the CPU
    teacher_run = _teacher_on_test(teacher, test, targets.output_kind, spec, callbacks)
    check()
    student_run = _student_on_test(task, result.student, inputs, teacher, paths.out)
    check()
    reference = _reference(task, test.labels, teacher_run.outputs)
    sides = {"teacher": _teacher_side(task, teacher, teacher_run, reference, inputs, device)}
    check()
    sides["student"] = _student_side(task, result.student, student_run, reference, inputs, device)
    check()
    # Timed in turn, as the files are, so the torch speedup does not depend on the order.
    student, one = result.student, evaluation.first_row(inputs, device)
    latencies = evaluation.paired_torch_latency_ms(
        [teacher.predict, lambda batch: student(**batch)], one, device
    )
    for name, latency in zip(("teacher", "student"), latencies, strict=True):
        sides[name]["torch_latency_ms"] = latency
    speed_runtime = _settle_speed(sides, teacher_run, student_run, test.arrays)
    check()
    baseline_run = None
    if baseline is not None:
        outputs = predict(baseline.student, inputs, 512, None).cpu().numpy()
        baseline_run = ScoredSide(outputs, "torch", "logits")
        sides["baseline"] = _student_side(
            task, baseline.student, baseline_run, reference, inputs, device
        )
        plain = baseline.student
        sides["baseline"]["torch_latency_ms"] = evaluation.measure_latency(
            lambda batch: plain(**batch), one, device
        )
        _settle_speed({"baseline": sides["baseline"]}, None, None, test.arrays)
        check()
    runs = {"teacher": teacher_run, "student": student_run, "baseline": baseline_run}
    quantized_sides = (
        {
            name: _quantized_side(
                task, found, teacher, teacher_run, student_run, sides["student"], reference, test
            )
            if found is not None
            else None
            for name, found in quantized.items()
        }
        if quantized
        else None
    )
    check()
    intervals = _intervals(task, runs, reference, spec.training.seed)
    check()
    metrics = evaluation.build_metrics(
        task=task,
        teacher=sides["teacher"],
        student=sides["student"],
        fidelity=evaluation.fidelity(
            student_run.outputs, teacher_run.outputs, task, teacher_run.kind, student_run.kind
        ),
        baseline=sides.get("baseline"),
        quantized=quantized_sides,
        extra={
            "split": _split_summary(data, reference),
            "device": str(device),
            "partial": result.stop_reason in PARTIAL_STOPS,
            "training": _training_summary(spec, task, teacher, targets, result),
            "intervals": intervals,
            "runtime": {
                **{name: run.runtime for name, run in runs.items() if run is not None},
                "speed": speed_runtime,
                "onnxruntime_threads": evaluation.THREADS,
            },
        },
        accept=_accept(spec),
    )
    check()
    metrics["parity"] = _parity(teacher, data, paths.out)
    check()
    return metrics


def _unevaluated_metrics(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    targets: TeacherTargets,
    trained: TrainedStudent,
    device: torch.device,
    stage: str,
) -> dict[str, Any]:
    """``metrics.json`` of a student cancelled before its evaluation ended: how it trained,
    the rows it trained and validated on, and a verdict that it is not deployable. No
    figure on the test rows is given, not even those measured before the cancellation."""
    result = trained.result
    return {
        "task": data.task,
        "evaluated": False,
        "partial": True,
        "device": str(device),
        "split": _row_counts(data),
        "training": _training_summary(spec, data.task, teacher, targets, result),
        "verdict": evaluation.not_evaluated(
            data.task,
            _accept(spec),
            f"the job was cancelled during its {stage}; the student was not evaluated on "
            "the test rows",
        ),
        "parity": None,
    }


def _teacher_on_test(
    teacher: TeacherRuntime,
    test: TransferSet,
    output_kind: str,
    spec: DistillationSpec,
    callbacks: Callbacks,
) -> ScoredSide:
    """The teacher on the test rows: its own ONNX file in onnxruntime, else its runtime."""
    graph_path = getattr(teacher, "graph_path", None)
    if graph_path is not None:
        zipmap = teacher.signature.extra.get("zipmap")
        output = zipmap["tensor"] if zipmap else teacher.signature.output
        try:
            onnx_file = OnnxFile(graph_path, output=output)
            outputs = onnx_file.predict(test.arrays)
            return ScoredSide(outputs, "onnxruntime", output_kind, onnx_file)
        except Exception as exc:  # onnxruntime raises its own exception types
            callbacks.event(
                "warning",
                {
                    "code": "teacher_file_not_scored",
                    "message": f"the teacher's ONNX file did not run in onnxruntime ({exc}); "
                    "it is scored in its runtime instead",
                },
            )
    outputs, _ = compute_teacher_outputs(
        teacher, test.arrays, batch_size=pass_batch_size(spec.training)
    )
    return ScoredSide(outputs.reshape(len(outputs), -1), "torch", output_kind)


def _student_on_test(
    task: str,
    student: nn.Module,
    inputs: dict[str, torch.Tensor],
    teacher: TeacherRuntime,
    out: Path,
) -> ScoredSide:
    """The student on the test rows: ``student.onnx`` in onnxruntime when it was exported."""
    path = out / "student.onnx"
    if not path.exists():
        outputs = predict(student, inputs, 512, None).cpu().numpy()
        return ScoredSide(outputs, "torch", "logits" if task == "classification" else "values")
    onnx_file = OnnxFile(path, output=_student_output(path, teacher))
    outputs = onnx_file.predict({name: value.numpy() for name, value in inputs.items()})
    kind = "values"
    if task == "classification":
        # A drop-in student gives probabilities where the teacher does.
        kind = "probabilities" if looks_like_probabilities(outputs) else "logits"
    return ScoredSide(outputs, "onnxruntime", kind, onnx_file)


def _quantized_side(
    task: str,
    quantized: Quantized,
    teacher: TeacherRuntime,
    teacher_run: ScoredSide,
    student_run: ScoredSide,
    student_side: dict[str, Any],
    reference: Reference,
    test: TransferSet,
) -> dict[str, Any]:
    """A quantized ``student.onnx`` on the test rows, in onnxruntime like the student file.

    Its task metrics, fidelity to the teacher and onnxruntime speed come from the same
    harness as the fp32 student's; where the fp32 student's onnxruntime speed was not
    measured (a teacher run in torch), it is measured here too, so the two compare.
    """
    path = quantized.path
    onnx_file = OnnxFile(path, output=_student_output(path, teacher))
    outputs = onnx_file.predict(test.arrays)
    kind = "values"
    if task == "classification":
        kind = "probabilities" if looks_like_probabilities(outputs) else "logits"
    if "onnxruntime_latency_ms" not in student_side and student_run.onnx is not None:
        student_side.update(student_run.onnx.speed(test.arrays))
    return {
        **evaluation.task_metrics(task, outputs[reference.rows], reference.values),
        "file_bytes": quantized.file_bytes,
        "bytes": quantized.weight_bytes,
        "method": quantized.method,
        "preprocessed": quantized.preprocessed,
        "fidelity": evaluation.fidelity(outputs, teacher_run.outputs, task, teacher_run.kind, kind),
        "runtime": "onnxruntime",
        **onnx_file.speed(test.arrays),
    }


def _student_output(path: Path, teacher: TeacherRuntime) -> str:
    """The student tensor that stands for the teacher's output.

    Where the drop-in student ends in a ZipMap (as a scikit-learn teacher does), the
    probabilities that feed it; else the output of the teacher's name, else the
    first float output.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    zipmaps = [n for n in graph.node if n.op_type == "ZipMap"]
    if zipmaps:
        return str(zipmaps[0].input[0])
    names = [o.name for o in graph.output]
    for name in (teacher.signature.output or "", "outputs"):
        if name in names:
            return name
    floats = [
        o.name
        for o in graph.output
        if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    ]
    return floats[0] if floats else names[0]


def _settle_speed(
    sides: dict[str, dict[str, Any]],
    teacher_run: ScoredSide | None,
    student_run: ScoredSide | None,
    arrays: dict[str, np.ndarray],
) -> str:
    """``latency_ms``/``throughput`` from onnxruntime when both files ran there, else torch.

    Both sides always keep their torch figures (``torch_latency_ms``, ``torch_throughput``);
    the onnxruntime ones are added under ``onnxruntime_*`` when measured.
    """
    files = [run.onnx for run in (teacher_run, student_run) if run is not None]
    both_files = len(files) == 2 and all(f is not None for f in files)
    if both_files:
        # Timed in turn, so the speedup does not depend on which file ran first.
        paired = evaluation.paired_latency_ms([f for f in files if f is not None], arrays)
        for name, run, latency in zip(
            ("teacher", "student"), (teacher_run, student_run), paired, strict=True
        ):
            if name in sides and run is not None and run.onnx is not None:
                sides[name]["onnxruntime_latency_ms"] = latency
                sides[name]["onnxruntime_throughput"] = run.onnx.throughput(arrays)
    runtime = "onnxruntime" if both_files else "torch"
    for side in sides.values():
        side["latency_ms"] = side.get(f"{runtime}_latency_ms", side["torch_latency_ms"])
        side["throughput"] = side.get(f"{runtime}_throughput", side["torch_throughput"])
    return runtime


def _torch_throughput(
    fn: Any, inputs: dict[str, torch.Tensor], device: torch.device
) -> dict[str, Any]:
    """``torch_throughput`` on up to 256 rows; the batch-1 latency is timed apart (in turn
    with the other side's, in :func:`_evaluate`)."""
    many = {name: value[:256].to(device) for name, value in inputs.items()}
    return {"torch_throughput": evaluation.measure_throughput(fn, many, device)}


def _reference(task: str, labels: np.ndarray | None, teacher_outputs: np.ndarray) -> Reference:
    """The labeled test rows and their labels; the teacher's outputs where there are none."""
    rows = np.flatnonzero(_labeled(labels)) if labels is not None else np.array([], dtype=int)
    if task == "embedding" or not len(rows):
        # Without labels the teacher is the reference (embeddings always are).
        values = teacher_outputs if task != "classification" else teacher_outputs.argmax(1)
        return Reference(np.arange(len(teacher_outputs)), values, "teacher")
    assert labels is not None
    values = labels[rows]
    if task == "regression":
        values = values.reshape(len(rows), -1).astype(np.float32)
    return Reference(rows, values, "labels")


def _teacher_side(
    task: str,
    teacher: TeacherRuntime,
    run: ScoredSide,
    reference: Reference,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
) -> dict[str, Any]:
    """The teacher's task metrics on the test rows, its size and its torch throughput."""
    return {
        **evaluation.task_metrics(task, run.outputs[reference.rows], reference.values),
        "parameters": teacher.signature.parameters,
        "bytes": teacher.signature.bytes,
        "file_bytes": teacher.signature.bytes,
        **_torch_throughput(teacher.predict, inputs, device),
    }


def _student_side(
    task: str,
    student: nn.Module,
    run: ScoredSide,
    reference: Reference,
    inputs: dict[str, torch.Tensor],
    device: torch.device,
) -> dict[str, Any]:
    """A trained student's task metrics on the test rows, its size and its torch throughput."""
    student.to(device)
    file_bytes = run.onnx.path.stat().st_size if run.onnx is not None else None
    external = run.onnx.path.with_name(run.onnx.path.name + ".data") if run.onnx else None
    if file_bytes is not None and external is not None and external.exists():
        file_bytes += external.stat().st_size
    return {
        **evaluation.task_metrics(task, run.outputs[reference.rows], reference.values),
        "parameters": count_parameters(student),
        "bytes": evaluation.module_bytes(student),
        "file_bytes": file_bytes,
        **_torch_throughput(lambda batch: student(**batch), inputs, device),
    }


def _row_counts(data: FittedData) -> dict[str, Any]:
    """Every split's size (the transfer set's own training rows apart from the mixed ones)
    and the test set's source."""
    return {
        "train_rows": len(data.train) - data.mixed_rows,
        "mixed_rows": data.mixed_rows,
        "validation_rows": len(data.validation),
        "test_rows": len(data.test),
        "test_source": data.test_source,
    }


def _split_summary(data: FittedData, reference: Reference) -> dict[str, Any]:
    """Which rows the figures come from: :func:`_row_counts`, the rows scored and what they
    were scored against."""
    return {**_row_counts(data), "scored_rows": len(reference.rows), "reference": reference.name}


def _intervals(
    task: str, runs: dict[str, ScoredSide | None], reference: Reference, seed: int
) -> dict[str, Any]:
    """Bootstrap 95% intervals of the primary task metric and of fidelity, on the test rows."""
    teacher = runs["teacher"]
    assert teacher is not None
    out: dict[str, Any] = {"confidence": 0.95, "resamples": 1000, "seed": seed, "baseline": None}
    for name, run in runs.items():
        if run is not None:
            out[name] = evaluation.task_metric_interval(
                task, run.outputs[reference.rows], reference.values, seed=seed
            )
    student = runs["student"]
    assert student is not None
    out["fidelity"] = evaluation.fidelity_interval(
        task, student.outputs, teacher.outputs, (student.kind, teacher.kind), seed=seed
    )
    return out


def _provenance(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    paths: JobPaths,
    device: torch.device,
    given: dict[str, Any],
) -> dict[str, Any]:
    """Where the student came from: inputs by sha256, versions, device, seed, spec."""

    def digest(path: Path | None) -> str | None:
        return sha256_file(path) if path is not None and path.is_file() else None

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {
        "job_id": None,
        "teacher_sha256": digest(paths.teacher) or teacher.digest,
        "dataset_sha256": digest(paths.dataset),
        "test_dataset_sha256": digest(paths.test_dataset),
        "engine": version("distillery"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
        "device": str(device),
        "seed": spec.training.seed,
        "spec": spec.model_dump(mode="json"),
        **given,
    }


def _training_summary(
    spec: DistillationSpec,
    task: str,
    teacher: TeacherRuntime,
    targets: TeacherTargets,
    result: TrainResult,
) -> dict[str, Any]:
    """How training went, for ``metrics.json``."""
    method = spec.method_for(task)
    return {
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "best_step": result.best_step,
        "seconds": round(result.seconds, 3),
        "samples_per_s": round(result.samples_per_s, 1),
        "teacher_backend": teacher.backend,
        "method": method,
        # What ``temperature: "auto"`` came to for this teacher's outputs.
        "temperature": (
            resolved_temperature(spec.method.temperature, targets.output_kind)
            if method == "kd"
            else None
        ),
        "plan": result.plan.to_dict() if result.plan is not None else None,
    }


# --------------------------------------------------------------------------- export and report


def _export(
    spec: DistillationSpec,
    teacher: TeacherRuntime,
    data: FittedData,
    trained: TrainedStudent,
    out: Path,
    callbacks: Callbacks,
    *,
    exported: Path | None = None,
) -> dict[str, Quantized | None]:
    """Write the student in the spec's formats, and ``student_config.json`` that rebuilds it.

    For an ONNX teacher, ``student.onnx`` is a drop-in: the teacher's inputs and outputs.
    ``exported`` is this very student's ONNX file, already written the same way (the
    ladder's chosen rung): it is copied instead of exported again.
    Returns the quantized students the spec asks for (``int8``: ``student.int8.onnx``),
    None where quantization failed: a warning, not a failed job.
    """
    callbacks.event("stage", {"stage": "export"})
    student = trained.result.student.cpu().eval()
    formats = spec.export.formats
    if "onnx" in formats and exported is not None and exported.is_file():
        for name in ("student.onnx", "student.onnx.data"):
            if (exported.parent / name).is_file():
                shutil.copyfile(exported.parent / name, out / name)
    elif "onnx" in formats:
        example = {name: value[:2].cpu() for name, value in trained.data.val.items()}
        export.export_onnx(student, example, out / "student.onnx")
        teacher_graph = _teacher_graph(teacher)
        if teacher_graph is not None:
            _export_dropin(teacher_graph, teacher.signature, student, data, out / "student.onnx")
    quantized: dict[str, Quantized | None] = {}
    if "int8" in spec.export.quantize and (out / "student.onnx").exists():
        quantized["int8"] = _quantize_int8(data, out / "student.onnx", callbacks)
    if "safetensors" in formats:
        export.export_safetensors(student, out / "student.safetensors", out / "student_config.json")
    else:
        (out / "student_config.json").write_text(json.dumps(student.config, indent=2))
    return quantized


def _quantize_int8(data: FittedData, path: Path, callbacks: Callbacks) -> Quantized | None:
    """``student.int8.onnx`` from ``path``, calibrated on training rows; None on failure."""
    rows = {name: array[: export.CALIBRATION_ROWS] for name, array in data.train.arrays.items()}
    try:
        return export.quantize_int8(path, rows)
    except Exception as exc:  # a failed quantization must not fail the job
        callbacks.event(
            "warning",
            {
                "code": "quantization_failed",
                "message": f"student.int8.onnx was not written: {exc}",
                "field": "export.quantize",
            },
        )
        return None


def _teacher_graph(teacher: TeacherRuntime) -> Path | None:
    """The ONNX teacher's graph file (extracted from a bundle), or None for other teachers."""
    if teacher.signature.format != "onnx":
        return None
    path = getattr(teacher, "graph_path", None)
    return Path(path) if path is not None else None


def _export_dropin(
    teacher_graph: Path,
    signature: TeacherSignature,
    student: nn.Module,
    data: FittedData,
    path: Path,
) -> None:
    """Rewrite ``student.onnx`` as a drop-in for the teacher, checked against the student."""
    rows = {name: array[:DROPIN_CHECK_ROWS] for name, array in data.validation.arrays.items()}
    expected = predict(student, to_tensors(rows, torch.device("cpu")), 512, None).numpy()
    export.make_dropin(path, teacher_graph, signature)
    export.check_dropin(path, signature, export.teacher_feed(signature, rows), expected)


def _parity(teacher: TeacherRuntime, data: FittedData, out: Path) -> dict[str, Any] | None:
    """Teacher and ``student.onnx`` in onnxruntime on the teacher's feed of held-out rows."""
    teacher_graph = _teacher_graph(teacher)
    student_file = out / "student.onnx"
    if teacher_graph is None or not student_file.exists():
        return None
    rows = {name: array[:PARITY_ROWS] for name, array in data.test.arrays.items()}
    feed = export.teacher_feed(teacher.signature, rows)
    return export.parity(teacher_graph, student_file, feed)


def _write_reports(
    spec: DistillationSpec,
    signature: TeacherSignature,
    trained: TrainedStudent,
    metrics: dict[str, Any],
    out: Path,
) -> list[Artifact]:
    """Write the metrics, the model card and the training curves; list every artifact."""
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    report.write_model_card(
        out / "model_card.md",
        metrics,
        spec.model_dump(mode="json"),
        signature.to_dict(),
        dict(trained.result.student.config),  # type: ignore[arg-type]
    )
    report.plot_training_curves(
        out / "training_curves.png",
        trained.result.history,
        best_step=trained.result.best_step,
        # The teacher agrees with itself: the line its student is climbing towards.
        teacher_reference={"val/agreement": 1.0, "val/cosine": 1.0, "val/output_mse": 0.0},
    )
    if metrics.get("ladder"):
        report.plot_student_ladder(out / "student_ladder.png", metrics["ladder"])
    return _artifacts_in(out)


def _artifacts_in(out: Path) -> list[Artifact]:
    """The artifacts written to ``out``, in the order of :data:`ARTIFACT_MEDIA_TYPES`."""
    artifacts = [
        Artifact.of(out / name, media_type)
        for name, media_type in ARTIFACT_MEDIA_TYPES.items()
        if (out / name).exists()
    ]
    # A large ONNX student keeps its weights beside it, in a file of their own.
    for name in ("student.onnx.data", "student.int8.onnx.data"):
        if (out / name).exists():
            artifacts.append(Artifact.of(out / name, "application/octet-stream"))
    return artifacts


def _report(
    task: str, metrics: dict[str, Any], artifacts: list[Artifact], result: TrainResult
) -> RunResult:
    """What the caller gets back: metrics, artifacts and how training ended."""
    return RunResult(
        task=task,
        metrics=metrics,
        artifacts=artifacts,
        stop_reason=result.stop_reason,
        partial=result.stop_reason in PARTIAL_STOPS,
        steps=result.steps,
        resumed_from=result.resumed_from,
        deployable=bool(metrics["verdict"]["deployable"]),
    )
