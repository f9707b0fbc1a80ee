"""Bootstrap 95% intervals for the task metric and fidelity, vectorised over resamples.

Each resample draws the scored rows with replacement (seeded, so a report can be
reproduced) and recomputes the statistic; the interval is the percentile range of the
resampled values. Resamples are drawn in chunks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from worker.engine.evaluation.metrics import (
    as_columns,
    as_scores,
    class_log_probs,
    json_number,
    row_cosines,
)

RESAMPLES = 1000
CONFIDENCE = 0.95
# Rows x resamples per chunk: bounds the index matrix and the gathered values.
_CHUNK_CELLS = 4_000_000

#: The metric the interval is drawn for, by task: the verdict's primary task metric.
INTERVAL_METRIC = {"classification": "accuracy", "regression": "r2", "embedding": "cosine"}
#: The fidelity figure the interval is drawn for, by task.
INTERVAL_FIDELITY = {
    "classification": "agreement",
    "regression": "r2_to_teacher",
    "embedding": "cosine",
}

Statistic = Callable[[np.ndarray], np.ndarray]


def bootstrap_interval(
    statistic: Statistic,
    rows: int,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """The percentile interval of ``statistic`` over ``resamples`` resamples of ``rows`` rows.

    ``statistic`` takes an (R, rows) matrix of row indices and returns R values, one
    per resample. None when there are no rows.
    """
    if rows == 0:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // rows)
    values = [
        statistic(rng.integers(0, rows, size=(min(chunk, resamples - start), rows)))
        for start in range(0, resamples, chunk)
    ]
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.nanpercentile(np.concatenate(values), [tail, 100 - tail])
    return float(low), float(high)


def mean_of_rows(per_row: np.ndarray) -> Statistic:
    """The statistic "mean of a per-row value" (accuracy, agreement, cosine)."""
    values = np.asarray(per_row, dtype=np.float64).reshape(-1)
    return lambda idx: values[idx].mean(axis=1)


def r2_of_rows(pred: np.ndarray, target: np.ndarray) -> Statistic:
    """The statistic R² (uniform over output columns), recomputed on each resample."""
    n = len(pred)
    predicted, targets = as_columns(pred, n), as_columns(target, n)

    def r2(idx: np.ndarray) -> np.ndarray:
        p, t = predicted[idx], targets[idx]  # (R, rows, D)
        ss_res = ((t - p) ** 2).sum(axis=1)
        ss_tot = ((t - t.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        # A constant resampled target scores 1 when matched exactly and 0 otherwise (sklearn).
        safe = np.where(ss_tot > 0, ss_tot, 1.0)
        scores = np.where(ss_tot > 0, 1.0 - ss_res / safe, (ss_res == 0).astype(float))
        return np.asarray(scores.mean(axis=1))

    return r2


def _interval(statistic: Statistic, rows: int, seed: int, metric: str) -> dict[str, Any]:
    everything = np.arange(rows)[None, :]
    estimate = json_number(statistic(everything)[0]) if rows else None
    bounds = bootstrap_interval(statistic, rows, seed=seed)
    low, high = bounds if bounds is not None else (None, None)
    return {
        "metric": metric,
        "estimate": estimate,
        "low": None if low is None else json_number(low),
        "high": None if high is None else json_number(high),
    }


def task_metric_interval(
    task: str, outputs: np.ndarray, reference: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """``{metric, estimate, low, high}`` for the task's primary metric of ``outputs``."""
    n = len(outputs)
    if task == "classification":
        correct = as_scores(outputs).argmax(axis=1) == np.asarray(reference).reshape(-1)
        statistic = mean_of_rows(correct)
    elif task == "regression":
        statistic = r2_of_rows(outputs, reference)
    else:
        statistic = mean_of_rows(row_cosines(as_columns(outputs, n), as_columns(reference, n)))
    return _interval(statistic, n, seed, INTERVAL_METRIC[task])


def fidelity_interval(
    task: str,
    student_out: np.ndarray,
    teacher_out: np.ndarray,
    kinds: tuple[str, str] = ("logits", "logits"),
    seed: int = 0,
) -> dict[str, Any]:
    """``{metric, estimate, low, high}`` for agreement, R² to the teacher, or cosine.

    ``kinds`` is (student, teacher) output kind, ``logits`` or ``probabilities``.
    """
    n = len(student_out)
    if task == "classification":
        same = class_log_probs(student_out, kinds[0]).argmax(axis=1) == class_log_probs(
            teacher_out, kinds[1]
        ).argmax(axis=1)
        statistic = mean_of_rows(same)
    elif task == "regression":
        statistic = r2_of_rows(student_out, teacher_out)
    else:
        statistic = mean_of_rows(
            row_cosines(as_columns(student_out, n), as_columns(teacher_out, n))
        )
    return _interval(statistic, n, seed, INTERVAL_FIDELITY[task])
