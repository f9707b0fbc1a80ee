"""One distillation job from files to artifacts: the engine's public entry point.

``run(spec, teacher_path=..., dataset_path=..., out_dir=...)`` loads the
teacher and the transfer set, checks that they fit each other and the spec,
computes the teacher's outputs once, builds and trains the student, evaluates
teacher and student on the same held-out split, and writes the artifacts.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.engine import evaluation, export
from worker.engine.compatibility import DataFacts, check_fits, check_labels, resolve_task
from worker.engine.data import TransferSet, load_transfer_set, split, tokenize
from worker.engine.errors import TeacherIncompatible
from worker.engine.export import sha256_file
from worker.engine.losses import build_loss
from worker.engine.signature import TeacherSignature
from worker.engine.spec import DistillationSpec
from worker.engine.students import StudentContext, build_student, count_parameters, rebuild_student
from worker.engine.teachers import TeacherRuntime, load_teacher
from worker.engine.training import (
    Callbacks,
    TrainingData,
    TrainResult,
    cache_key,
    cached_teacher_outputs,
    predict,
    resolve_device,
    to_tensors,
    train,
)

#: Media types of the artifacts every job ends with.
ARTIFACT_MEDIA_TYPES: dict[str, str] = {
    "student.onnx": "application/onnx",
    "student.safetensors": "application/octet-stream",
    "student_config.json": "application/json",
    "metrics.json": "application/json",
    "model_card.md": "text/markdown; charset=utf-8",
    "training_curves.png": "image/png",
}


@dataclass
class Artifact:
    name: str
    path: Path
    bytes: int
    sha256: str
    media_type: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "media_type": self.media_type,
        }


@dataclass
class RunResult:
    task: str
    metrics: dict[str, Any]
    artifacts: list[Artifact]
    stop_reason: str
    partial: bool
    steps: int
    resumed_from: int | None


# --------------------------------------------------------------------------- checks


def looks_like_probabilities(outputs: np.ndarray, atol: float = 1e-3) -> bool:
    """Rows that are non-negative and sum to 1: a classifier's probabilities, not logits."""
    if outputs.ndim != 2 or outputs.shape[1] < 2 or not len(outputs):
        return False
    return bool((outputs >= 0).all() and np.allclose(outputs.sum(1), 1.0, atol=atol))


def _labeled(labels: np.ndarray) -> np.ndarray:
    """Rows that carry a label: class id -1 (or NaN for targets) marks an unlabeled row."""
    if np.issubdtype(labels.dtype, np.integer):
        return labels >= 0
    return ~np.isnan(labels).reshape(len(labels), -1).any(axis=1)


# --------------------------------------------------------------------------- baseline


class LabelsOnlyLoss(nn.Module):
    """The baseline's loss: the student learns from labels alone, no teacher."""

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        assert labels is not None
        out = student_out.float()
        if self.task == "classification":
            return {"hard": nn.functional.cross_entropy(out, labels, ignore_index=-1)}
        return {"hard": nn.functional.mse_loss(out, labels.float().reshape(out.shape))}


def _reference_targets(task: str, labels: np.ndarray, output_dim: int) -> torch.Tensor:
    """Labels shaped like teacher outputs, so validation can score a labels-only student."""
    if task == "classification":
        return nn.functional.one_hot(torch.from_numpy(labels), output_dim).float()
    return torch.from_numpy(labels.astype(np.float32).reshape(len(labels), -1))


# --------------------------------------------------------------------------- evaluation


def _task_metrics(task: str, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    if task == "classification":
        return evaluation.classification_metrics(outputs, reference)
    if task == "regression":
        return evaluation.regression_metrics(outputs.reshape(len(outputs), -1), reference)
    return evaluation.embedding_metrics(outputs, reference)


def _speed(fn: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    one = {k: v[:1].to(device) for k, v in tensors.items()}
    many = {k: v[:256].to(device) for k, v in tensors.items()}
    return {
        "latency_ms": evaluation.measure_latency(fn, one, device),
        "throughput": evaluation.measure_throughput(fn, many, device),
    }


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
) -> RunResult:
    """Distil the teacher at ``teacher_path`` on the transfer set at ``dataset_path``.

    ``out_dir`` receives the artifacts. ``cache_dir`` makes the teacher-output
    cache reusable across runs; ``checkpoint_dir`` enables checkpoints and
    resumes from the latest one found there.
    """
    cb = callbacks or Callbacks()
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="distill-")) if work_dir is None else Path(work_dir)
    try:
        return _run(
            spec,
            teacher_path=Path(teacher_path),
            dataset_path=Path(dataset_path),
            out=out,
            dev=dev,
            cache_dir=Path(cache_dir) if cache_dir else None,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            work=work,
            cb=cb,
        )
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(
    spec: DistillationSpec,
    *,
    teacher_path: Path,
    dataset_path: Path,
    out: Path,
    dev: torch.device,
    cache_dir: Path | None,
    checkpoint_dir: Path | None,
    work: Path,
    cb: Callbacks,
) -> RunResult:
    torch.manual_seed(spec.training.seed)
    cb.event("stage", {"stage": "loading"})
    ts = load_transfer_set(dataset_path, spec.data)
    teacher: TeacherRuntime = load_teacher(teacher_path, device=dev, work_dir=work / "teacher")
    sig = teacher.signature
    if ts.modality == "text":
        if teacher.tokenizer is None:
            raise TeacherIncompatible(
                "a text transfer set needs a teacher that ships its tokenizer", field="dataset_id"
            )
        max_length = spec.data.max_length
        limit = sig.extra.get("max_length")
        if isinstance(limit, int) and 0 < limit < max_length:
            # Past its position table the teacher cannot run at all.
            cb.event(
                "warning",
                {
                    "code": "max_length_clamped",
                    "message": f"data.max_length {max_length} is beyond the teacher's limit; "
                    f"using {limit}",
                },
            )
            max_length = limit
        ts = tokenize(ts, teacher.tokenizer, max_length)
    task = resolve_task(spec, sig)
    facts = DataFacts(
        modality=ts.modality,
        feature_shape=ts.feature_shape,
        labelled_rows=ts.labelled_rows,
        label_kind=ts.label_kind,
        num_classes=ts.num_classes,
    )
    check_fits(sig, facts)
    check_labels(task, spec, facts, sig.num_classes)
    train_ts, val_ts = split(ts, spec.evaluation.validation_split, spec.training.seed)
    output_kind = sig.output_kind or ("logits" if task == "classification" else "values")

    prepare = getattr(teacher, "prepare", None)
    if prepare is not None:
        prepare(to_tensors({k: v[:64] for k, v in train_ts.arrays.items()}, dev))

    method = spec.method_for(task)
    wants_hint = method == "hint" or any(t.name == "hint" for t in spec.method.extra_terms)
    hint_layer = None
    if wants_hint:
        candidates = teacher.hint_layers()
        hint_layer = spec.method.hint_layer or (candidates[0] if candidates else None)
        if hint_layer is None:
            raise TeacherIncompatible(
                "hint needs an intermediate teacher layer and none was found; name one",
                field="method.hint_layer",
            )

    # The teacher runs once over the transfer set; the cache key covers what it saw.
    cb.event("stage", {"stage": "teacher_outputs"})
    batch_size = max(spec.training.batch_size, 256)
    pre = {
        "data": spec.data.model_dump(),
        "split": [spec.evaluation.validation_split, spec.training.seed],
    }

    def teacher_outputs(
        part: str, arrays: dict[str, np.ndarray], hint: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return cached_teacher_outputs(
            teacher,
            arrays,
            key=cache_key(teacher.digest, ts.digest, {**pre, "part": part}),
            cache_dir=cache_dir,
            batch_size=batch_size,
            hint_layer=hint,
            callbacks=cb,
        )

    val_teacher, _ = teacher_outputs("val", val_ts.arrays)
    online = spec.method.teacher_outputs == "online"
    train_teacher: np.ndarray | None = None
    train_feat: np.ndarray | None = None
    if not online:
        train_teacher, train_feat = teacher_outputs("train", train_ts.arrays, hint_layer)
    val_teacher = val_teacher.reshape(len(val_teacher), -1)
    output_dim = val_teacher.shape[1]
    if (
        task == "classification"
        and output_kind == "logits"
        and looks_like_probabilities(val_teacher)
    ):
        # The graph hides its softmax (e.g. written out as exp / sum): softmaxing
        # these again would flatten every soft target towards uniform.
        output_kind = "probabilities"
        cb.event(
            "warning",
            {
                "code": "teacher_outputs_probabilities",
                "message": "the teacher's outputs are probabilities (non-negative, rows sum "
                "to 1); they are taken in log space",
            },
        )
    teacher_feat_dim = None
    if hint_layer is not None:
        probe = to_tensors({k: v[:2] for k, v in train_ts.arrays.items()}, dev)
        teacher_feat_dim = int(teacher.predict_with_features(probe, hint_layer)[1].shape[1])

    ctx = StudentContext(
        task=task,
        modality=ts.modality,
        input_shape=tuple(next(iter(ts.arrays.values())).shape[1:]),
        input_names=list(ts.arrays),
        output_dim=output_dim,
        teacher_parameters=sig.parameters,
        teacher_bytes=sig.bytes,
        vocab_size=_vocab_size(teacher),
        teacher=teacher,
    )
    student = build_student(spec.student, ctx)
    student_config = dict(student.config)  # type: ignore[arg-type]
    has_labels = train_ts.labels is not None and bool(_labeled(train_ts.labels).any())
    loss_fn = build_loss(
        spec,
        task,
        output_kind,
        has_labels,
        int(student.feature_dim),  # type: ignore[arg-type]
        teacher_feat_dim,
    )
    cb.event(
        "stage",
        {
            "stage": "training",
            "student": student_config.get("architecture"),
            "student_parameters": count_parameters(student),
            "teacher_backend": teacher.backend,
        },
    )

    labels_t = (
        torch.from_numpy(_train_labels(task, train_ts.labels))
        if has_labels and train_ts.labels is not None
        else None
    )
    data = TrainingData(
        train=to_tensors(train_ts.arrays, torch.device("cpu")),
        train_teacher=(
            torch.from_numpy(train_teacher.reshape(len(train_teacher), -1))
            if train_teacher is not None
            else None
        ),
        train_labels=labels_t,
        val=to_tensors(val_ts.arrays, torch.device("cpu")),
        val_teacher=torch.from_numpy(val_teacher),
        train_features=torch.from_numpy(train_feat) if train_feat is not None else None,
        online_teacher=teacher if online else None,
        hint_layer=hint_layer if online else None,
    )
    _move_if_small(data, dev)
    result = train(
        student=student,
        loss_fn=loss_fn,
        data=data,
        spec=spec.training,
        task=task,
        teacher_output_kind=output_kind,
        device=dev,
        callbacks=cb,
        checkpoint_dir=checkpoint_dir,
    )

    baseline_result: TrainResult | None = None
    if spec.evaluation.baseline:
        cb.event("stage", {"stage": "baseline"})
        baseline_result = _train_baseline(
            spec, task, student_config, train_ts, val_ts, output_dim, dev, cb
        )

    cb.event("stage", {"stage": "evaluation"})
    metrics = _evaluate(
        spec=spec,
        task=task,
        output_kind=output_kind,
        teacher=teacher,
        student=result.student,
        baseline=baseline_result.student if baseline_result else None,
        val_ts=val_ts,
        val_teacher=val_teacher,
        data=data,
        dev=dev,
        result=result,
    )
    cb.event("evaluation", {"final": True, "metrics": metrics})

    cb.event("stage", {"stage": "export"})
    artifacts = _write_artifacts(
        out=out,
        spec=spec,
        student=result.student,
        metrics=metrics,
        signature=sig,
        history=result.history,
        example={k: v[:2] for k, v in data.val.items()},
    )
    return RunResult(
        task=task,
        metrics=metrics,
        artifacts=artifacts,
        stop_reason=result.stop_reason,
        partial=result.stop_reason == "time_budget",
        steps=result.steps,
        resumed_from=result.resumed_from,
    )


def _vocab_size(teacher: TeacherRuntime) -> int | None:
    tok = teacher.tokenizer
    return len(tok) if tok is not None else None


def _train_labels(task: str, labels: np.ndarray) -> np.ndarray:
    if task == "classification":
        return labels.astype(np.int64)
    return labels.astype(np.float32)


def _move_if_small(data: TrainingData, dev: torch.device, limit: int = 2 * 2**30) -> None:
    """Keep the whole training set on the device when it fits comfortably; no loader needed."""
    if dev.type == "cpu":
        return
    tensors = [*data.train.values(), *data.val.values()]
    size = sum(t.numel() * t.element_size() for t in tensors)
    if size > limit:
        return
    data.train = {k: v.to(dev) for k, v in data.train.items()}
    data.val = {k: v.to(dev) for k, v in data.val.items()}
    for name in ("train_teacher", "train_labels", "train_features", "val_teacher"):
        value = getattr(data, name)
        if value is not None:
            setattr(data, name, value.to(dev))


def _train_baseline(
    spec: DistillationSpec,
    task: str,
    student_config: dict[str, Any],
    train_ts: TransferSet,
    val_ts: TransferSet,
    output_dim: int,
    dev: torch.device,
    cb: Callbacks,
) -> TrainResult:
    """The same student, freshly initialised, trained on the labeled rows alone."""
    assert train_ts.labels is not None
    rows = np.flatnonzero(_labeled(train_ts.labels))
    labeled = train_ts.subset(rows)
    assert labeled.labels is not None
    val_rows = (
        np.flatnonzero(_labeled(val_ts.labels)) if val_ts.labels is not None else np.array([], int)
    )
    torch.manual_seed(spec.training.seed)
    student = rebuild_student(student_config)
    if len(val_rows):
        val = val_ts.subset(val_rows)
        assert val.labels is not None
        val_tensors = to_tensors(val.arrays, torch.device("cpu"))
        reference = _reference_targets(task, val.labels, output_dim)
    else:
        # No labeled validation rows: select on the training labels instead.
        val_tensors = to_tensors(labeled.arrays, torch.device("cpu"))
        reference = _reference_targets(task, labeled.labels, output_dim)
    data = TrainingData(
        train=to_tensors(labeled.arrays, torch.device("cpu")),
        train_teacher=None,
        train_labels=torch.from_numpy(_train_labels(task, labeled.labels)),
        val=val_tensors,
        val_teacher=reference,
    )
    _move_if_small(data, dev)
    return train(
        student=student,
        loss_fn=LabelsOnlyLoss(task),
        data=data,
        spec=spec.training,
        task="classification" if task == "classification" else "regression",
        teacher_output_kind="values",
        device=dev,
        callbacks=Callbacks(on_event=lambda kind, d: cb.event(f"baseline_{kind}", d)),
        use_teacher=False,
    )


def _evaluate(
    *,
    spec: DistillationSpec,
    task: str,
    output_kind: str,
    teacher: TeacherRuntime,
    student: nn.Module,
    baseline: nn.Module | None,
    val_ts: TransferSet,
    val_teacher: np.ndarray,
    data: TrainingData,
    dev: torch.device,
    result: TrainResult,
) -> dict[str, Any]:
    """Teacher, student (and baseline) on the same held-out rows, against the same reference."""
    amp = None
    student_out = predict(student, data.val, 512, amp).cpu().numpy()
    labels = val_ts.labels
    rows = np.flatnonzero(_labeled(labels)) if labels is not None else np.array([], dtype=int)
    if task == "embedding" or not len(rows):
        # Without labels the teacher is the reference (embeddings always are).
        rows = np.arange(len(val_teacher))
        reference = val_teacher if task != "classification" else val_teacher.argmax(1)
        reference_name = "teacher"
    else:
        assert labels is not None
        reference = labels[rows]
        reference_name = "labels"
        if task == "regression":
            reference = reference.reshape(len(rows), -1).astype(np.float32)

    teacher_params = teacher.signature.parameters
    teacher_metrics: dict[str, Any] = {
        **_task_metrics(task, val_teacher[rows], reference),
        "parameters": teacher_params,
        "bytes": teacher.signature.bytes,
        **_speed(teacher.predict, data.val, dev),
    }
    student_metrics: dict[str, Any] = {
        **_task_metrics(task, student_out[rows], reference),
        "parameters": count_parameters(student),
        "bytes": _module_bytes(student),
        **_speed(lambda b: student(**b), data.val, dev),
    }
    baseline_metrics = None
    if baseline is not None:
        baseline_out = predict(baseline, data.val, 512, amp).cpu().numpy()
        baseline_metrics = {
            **_task_metrics(task, baseline_out[rows], reference),
            "parameters": count_parameters(baseline),
            "bytes": _module_bytes(baseline),
            **_speed(lambda b: baseline(**b), data.val, dev),
        }
    fidelity = evaluation.fidelity(student_out, val_teacher, task, output_kind)
    return evaluation.build_metrics(
        task=task,
        teacher=teacher_metrics,
        student=student_metrics,
        fidelity=fidelity,
        baseline=baseline_metrics,
        extra={
            "split": {"validation_rows": len(val_teacher), "reference": reference_name},
            "device": str(dev),
            "partial": result.stop_reason == "time_budget",
            "training": {
                "steps": result.steps,
                "stop_reason": result.stop_reason,
                "best_step": result.best_step,
                "seconds": round(result.seconds, 3),
                "samples_per_s": round(result.samples_per_s, 1),
                "teacher_backend": teacher.backend,
                "method": spec.method_for(task),
            },
        },
    )


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _write_artifacts(
    *,
    out: Path,
    spec: DistillationSpec,
    student: nn.Module,
    metrics: dict[str, Any],
    signature: TeacherSignature,
    history: list[dict[str, Any]],
    example: dict[str, torch.Tensor],
) -> list[Artifact]:
    student = student.cpu().eval()
    example = {k: v.cpu() for k, v in example.items()}
    formats = spec.export.formats
    if "onnx" in formats:
        export.export_onnx(student, example, out / "student.onnx")
    if "safetensors" in formats:
        export.export_safetensors(student, out / "student.safetensors", out / "student_config.json")
    else:
        (out / "student_config.json").write_text(json.dumps(student.config, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    export.write_model_card(
        out / "model_card.md",
        metrics,
        spec.model_dump(mode="json"),
        signature.to_dict(),
        dict(student.config),  # type: ignore[arg-type]
    )
    export.plot_training_curves(out / "training_curves.png", history)
    artifacts = []
    for name, media_type in ARTIFACT_MEDIA_TYPES.items():
        path = out / name
        if path.exists():
            artifacts.append(
                Artifact(name, path, path.stat().st_size, sha256_file(path), media_type)
            )
    extra = out / "student.onnx.data"
    if extra.exists():
        artifacts.append(
            Artifact(
                extra.name,
                extra,
                extra.stat().st_size,
                sha256_file(extra),
                "application/octet-stream",
            )
        )
    return artifacts
