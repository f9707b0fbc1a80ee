"""Task metrics and fidelity to the teacher: pure functions on numpy arrays.

The teacher (whatever its runtime), the student and the labels-only baseline are all
scored by the same code on the same held-out rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TASKS = ("classification", "regression", "embedding")

#: The task metrics each side (teacher, student, baseline) carries, by task.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "top5_accuracy", "f1_macro"),
    "regression": ("mae", "mse", "r2"),
    "embedding": ("cosine",),
}

#: Fidelity keys; every one is present in every report, null where it does not apply.
FIDELITY_KEYS = ("agreement", "kl_divergence", "output_mse", "r2_to_teacher", "cosine")

# Probabilities are clamped before the log so a hard 0 from a tree ensemble stays finite.
_PROB_EPS = 1e-12
_COS_EPS = 1e-8


# --------------------------------------------------------------------------- task metrics


def as_scores(outputs: np.ndarray) -> np.ndarray:
    """(N, K) class scores; a single column is read as a binary logit (scores [0, z])."""
    scores = np.asarray(outputs, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2:
        raise ValueError(f"class scores must be (N, K), got shape {list(scores.shape)}")
    if scores.shape[1] == 1:
        scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
    return scores


def json_number(x: float | np.floating[Any]) -> float | None:
    """A JSON-safe float: NaN and infinities become None (JSON has no NaN)."""
    value = float(x)
    return value if math.isfinite(value) else None


def f1_macro(pred: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean F1 over the classes present in ``labels`` or ``pred`` (sklearn's macro)."""
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    classes = np.union1d(labels, pred)
    if classes.size == 0:
        return 0.0
    tp = np.array([np.sum((pred == c) & (labels == c)) for c in classes], dtype=np.float64)
    fp = np.array([np.sum((pred == c) & (labels != c)) for c in classes], dtype=np.float64)
    fn = np.array([np.sum((pred != c) & (labels == c)) for c in classes], dtype=np.float64)
    denom = 2 * tp + fp + fn
    # A class with no true positives scores 0, as sklearn does with zero_division=0.
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean())


def classification_metrics(outputs: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Accuracy, top-min(5, K) accuracy and macro F1 of class scores ``outputs`` (N, K).

    ``labels`` are class ids (N,). Scores may be logits or probabilities: only their
    order matters. A single-column output is read as a binary logit.
    """
    scores = as_scores(outputs)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} outputs but {len(labels)} labels")
    if len(labels) == 0:
        return {"accuracy": None, "top5_accuracy": None, "f1_macro": None}
    pred = scores.argmax(axis=1)
    k = min(5, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return {
        "accuracy": json_number(np.mean(pred == labels)),
        "top5_accuracy": json_number(np.mean((top == labels[:, None]).any(axis=1))),
        "f1_macro": json_number(f1_macro(pred, labels)),
    }


def r2_score(pred: np.ndarray, target: np.ndarray) -> float:
    """R² averaged uniformly over output columns, as sklearn's ``r2_score``."""
    ss_res = ((target - pred) ** 2).sum(axis=0)
    ss_tot = ((target - target.mean(axis=0)) ** 2).sum(axis=0)
    # A constant target column: perfect predictions score 1, anything else 0 (sklearn).
    r2 = np.where(
        ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), (ss_res == 0).astype(float)
    )
    return float(r2.mean())


def as_columns(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` as float64 rows of ``n``: one column per output."""
    return np.asarray(x, dtype=np.float64).reshape(n, -1)


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float | None]:
    """Mean absolute error, mean squared error and R² (uniform over output columns)."""
    pred = np.asarray(pred)
    n = len(pred)
    predicted, targets = as_columns(pred, n), as_columns(target, n)
    if predicted.shape != targets.shape:
        raise ValueError(
            f"predictions {list(predicted.shape)} and targets {list(targets.shape)} differ"
        )
    if n == 0:
        return {"mae": None, "mse": None, "r2": None}
    return {
        "mae": json_number(np.abs(predicted - targets).mean()),
        "mse": json_number(((predicted - targets) ** 2).mean()),
        "r2": json_number(r2_score(predicted, targets)),
    }


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    dot = (a * b).sum(axis=1)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), _COS_EPS)
    return np.asarray(dot / norms)


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(row_cosines(a, b).mean())


def embedding_metrics(student: np.ndarray, teacher: np.ndarray) -> dict[str, float | None]:
    """Mean cosine similarity between rows of ``student`` and ``teacher`` embeddings."""
    student = np.asarray(student)
    n = len(student)
    student_rows, teacher_rows = as_columns(student, n), as_columns(teacher, n)
    if student_rows.shape != teacher_rows.shape:
        raise ValueError(
            f"embeddings {list(student_rows.shape)} and {list(teacher_rows.shape)} differ"
        )
    if n == 0:
        return {"cosine": None}
    return {"cosine": json_number(_mean_cosine(student_rows, teacher_rows))}


def task_metrics(task: str, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """The task's metrics of ``outputs`` against ``reference``: labels or the teacher's outputs."""
    if task == "classification":
        return classification_metrics(outputs, reference)
    if task == "regression":
        return regression_metrics(outputs.reshape(len(outputs), -1), reference)
    return embedding_metrics(outputs, reference)


# --------------------------------------------------------------------------- fidelity


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def class_log_probs(outputs: np.ndarray, output_kind: str) -> np.ndarray:
    """Log-probabilities at T=1; probability outputs are logged, never softmaxed."""
    if output_kind == "probabilities":
        probs = np.asarray(outputs, dtype=np.float64)
        if probs.ndim == 1:
            probs = probs[:, None]
        if probs.shape[1] == 1:
            probs = np.concatenate([1.0 - probs, probs], axis=1)
        # log_softmax of log p renormalises rows that do not sum exactly to 1.
        return _log_softmax(np.log(np.clip(probs, _PROB_EPS, None)))
    return _log_softmax(as_scores(outputs))


def fidelity(
    student_out: np.ndarray,
    teacher_out: np.ndarray,
    task: str,
    teacher_output_kind: str | None,
    student_output_kind: str = "logits",
) -> dict[str, float | None]:
    """How closely the student reproduces the teacher on the same rows.

    Every key of :data:`FIDELITY_KEYS` is returned, None where it does not apply:

    - classification: ``agreement`` (fraction of equal argmax), ``kl_divergence``
      (KL(teacher || student) at T=1, mean over rows) and ``output_mse`` between the
      probability vectors; each side's outputs are read as its ``*_output_kind`` says
      (``logits`` or ``probabilities``);
    - regression: ``output_mse`` between raw outputs and ``r2_to_teacher`` (R² of the
      student's outputs taking the teacher's as the target);
    - embedding: ``output_mse`` between raw outputs and mean ``cosine`` to the teacher.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    out: dict[str, float | None] = dict.fromkeys(FIDELITY_KEYS)
    n = len(np.asarray(student_out))
    if n == 0:
        return out
    if task == "classification":
        student_log = class_log_probs(student_out, student_output_kind)
        teacher_log = class_log_probs(teacher_out, teacher_output_kind or "logits")
        if student_log.shape != teacher_log.shape:
            raise ValueError(
                f"student {list(student_log.shape)} and teacher {list(teacher_log.shape)} differ"
            )
        teacher_probs = np.exp(teacher_log)
        out["agreement"] = json_number(np.mean(student_log.argmax(1) == teacher_log.argmax(1)))
        kl_per_row = (teacher_probs * (teacher_log - student_log)).sum(axis=1)
        out["kl_divergence"] = json_number(kl_per_row.mean())
        out["output_mse"] = json_number(((np.exp(student_log) - teacher_probs) ** 2).mean())
        return out
    student, teacher = as_columns(student_out, n), as_columns(teacher_out, n)
    if student.shape != teacher.shape:
        raise ValueError(f"student {list(student.shape)} and teacher {list(teacher.shape)} differ")
    out["output_mse"] = json_number(((student - teacher) ** 2).mean())
    if task == "regression":
        out["r2_to_teacher"] = json_number(r2_score(student, teacher))
    else:
        out["cosine"] = json_number(_mean_cosine(student, teacher))
    return out
