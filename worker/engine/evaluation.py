"""How good the student is: task metrics, fidelity to the teacher, speed, and metrics.json.

Task metrics and fidelity are pure functions on numpy arrays, so the teacher (whatever
its backend), the student and the labels-only baseline are all scored by the same code
on the same held-out rows. Speed is measured on callables taking a batch dict, which
covers torch modules (``lambda b: student(**b)``) and onnxruntime-backed teachers
(``teacher.predict``) alike. :func:`build_metrics` assembles the ``metrics.json``
object described in DESIGN.md and :data:`METRICS_SCHEMA` describes it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

TASKS = ("classification", "regression", "embedding")

#: The task metrics each side (teacher, student, baseline) carries, by task.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "top5_accuracy", "f1_macro"),
    "regression": ("mae", "mse", "r2"),
    "embedding": ("cosine",),
}

#: Fidelity keys; every one is present in every report, null where it does not apply.
FIDELITY_KEYS = ("agreement", "kl_divergence", "output_mse", "r2_to_teacher", "cosine")

SIDE_KEYS = ("parameters", "bytes", "latency_ms", "throughput")

#: The metric the baseline verdict compares, and whether higher is better.
PRIMARY_METRIC: dict[str, tuple[str, bool]] = {
    "classification": ("accuracy", True),
    "regression": ("mse", False),
    "embedding": ("cosine", True),
}

#: Distillation "helped" only when it beats the baseline by more than this: absolute for
#: bounded scores (accuracy, cosine), relative for errors (mse). Smaller gaps are noise.
VERDICT_TOLERANCE = 0.005

# Probabilities are clamped before the log so a hard 0 from a tree ensemble stays finite.
_PROB_EPS = 1e-12
_COS_EPS = 1e-8


# --------------------------------------------------------------------------- task metrics


def _as_scores(outputs: np.ndarray) -> np.ndarray:
    """(N, K) class scores; a single column is read as a binary logit (scores [0, z])."""
    scores = np.asarray(outputs, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2:
        raise ValueError(f"class scores must be (N, K), got shape {list(scores.shape)}")
    if scores.shape[1] == 1:
        scores = np.concatenate([np.zeros_like(scores), scores], axis=1)
    return scores


def _num(x: float | np.floating[Any]) -> float | None:
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
    scores = _as_scores(outputs)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} outputs but {len(labels)} labels")
    if len(labels) == 0:
        return {"accuracy": None, "top5_accuracy": None, "f1_macro": None}
    pred = scores.argmax(axis=1)
    k = min(5, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return {
        "accuracy": _num(np.mean(pred == labels)),
        "top5_accuracy": _num(np.mean((top == labels[:, None]).any(axis=1))),
        "f1_macro": _num(f1_macro(pred, labels)),
    }


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    """R² averaged uniformly over output columns, as sklearn's ``r2_score``."""
    ss_res = ((target - pred) ** 2).sum(axis=0)
    ss_tot = ((target - target.mean(axis=0)) ** 2).sum(axis=0)
    # A constant target column: perfect predictions score 1, anything else 0 (sklearn).
    r2 = np.where(
        ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), (ss_res == 0).astype(float)
    )
    return float(r2.mean())


def _columns(x: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(n, -1)


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float | None]:
    """Mean absolute error, mean squared error and R² (uniform over output columns)."""
    pred = np.asarray(pred)
    n = len(pred)
    predicted, targets = _columns(pred, n), _columns(target, n)
    if predicted.shape != targets.shape:
        raise ValueError(
            f"predictions {list(predicted.shape)} and targets {list(targets.shape)} differ"
        )
    if n == 0:
        return {"mae": None, "mse": None, "r2": None}
    return {
        "mae": _num(np.abs(predicted - targets).mean()),
        "mse": _num(((predicted - targets) ** 2).mean()),
        "r2": _num(_r2(predicted, targets)),
    }


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    dot = (a * b).sum(axis=1)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), _COS_EPS)
    return float((dot / norms).mean())


def embedding_metrics(student: np.ndarray, teacher: np.ndarray) -> dict[str, float | None]:
    """Mean cosine similarity between rows of ``student`` and ``teacher`` embeddings."""
    student = np.asarray(student)
    n = len(student)
    student_rows, teacher_rows = _columns(student, n), _columns(teacher, n)
    if student_rows.shape != teacher_rows.shape:
        raise ValueError(
            f"embeddings {list(student_rows.shape)} and {list(teacher_rows.shape)} differ"
        )
    if n == 0:
        return {"cosine": None}
    return {"cosine": _num(_mean_cosine(student_rows, teacher_rows))}


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


def _teacher_log_probs(teacher_out: np.ndarray, output_kind: str) -> np.ndarray:
    """Teacher log-probabilities at T=1; probability outputs are logged, never softmaxed."""
    if output_kind == "probabilities":
        probs = np.asarray(teacher_out, dtype=np.float64)
        if probs.ndim == 1:
            probs = probs[:, None]
        if probs.shape[1] == 1:
            probs = np.concatenate([1.0 - probs, probs], axis=1)
        # log_softmax of log p renormalises rows that do not sum exactly to 1.
        return _log_softmax(np.log(np.clip(probs, _PROB_EPS, None)))
    return _log_softmax(_as_scores(teacher_out))


def fidelity(
    student_out: np.ndarray,
    teacher_out: np.ndarray,
    task: str,
    teacher_output_kind: str | None,
) -> dict[str, float | None]:
    """How closely the student reproduces the teacher on the same rows.

    Every key of :data:`FIDELITY_KEYS` is returned, None where it does not apply:

    - classification: ``agreement`` (fraction of equal argmax), ``kl_divergence``
      (KL(teacher || student) at T=1, mean over rows; the student's outputs are logits)
      and ``output_mse`` between the probability vectors;
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
        student_log = _log_softmax(_as_scores(student_out))
        teacher_log = _teacher_log_probs(teacher_out, teacher_output_kind or "logits")
        if student_log.shape != teacher_log.shape:
            raise ValueError(
                f"student {list(student_log.shape)} and teacher {list(teacher_log.shape)} differ"
            )
        teacher_probs = np.exp(teacher_log)
        out["agreement"] = _num(np.mean(student_log.argmax(1) == teacher_log.argmax(1)))
        kl_per_row = (teacher_probs * (teacher_log - student_log)).sum(axis=1)
        out["kl_divergence"] = _num(kl_per_row.mean())
        out["output_mse"] = _num(((np.exp(student_log) - teacher_probs) ** 2).mean())
        return out
    student, teacher = _columns(student_out, n), _columns(teacher_out, n)
    if student.shape != teacher.shape:
        raise ValueError(f"student {list(student.shape)} and teacher {list(teacher.shape)} differ")
    out["output_mse"] = _num(((student - teacher) ** 2).mean())
    if task == "regression":
        out["r2_to_teacher"] = _num(_r2(student, teacher))
    else:
        out["cosine"] = _num(_mean_cosine(student, teacher))
    return out


# --------------------------------------------------------------------------- speed

Batch = Mapping[str, torch.Tensor] | torch.Tensor


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    first = next(iter(batch.values()))
    return int(first.shape[0])


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without this a timer measures only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(fn: Callable[[Any], Any], batch: Batch) -> None:
    with torch.no_grad():
        fn(batch)


def measure_latency(
    fn: Callable[[Any], Any],
    example_batch_1: Batch,
    device: torch.device | str,
    warmup: int = 3,
    repeats: int = 20,
    budget_s: float = 2.0,
) -> float:
    """Median wall time in milliseconds of ``fn(example_batch_1)``, a batch of one.

    ``fn`` takes the batch as it is given (e.g. ``teacher.predict`` or
    ``lambda b: student(**b)``) and runs under ``torch.no_grad``. Warm-up and timed
    calls stop early once ``budget_s`` is spent, after at least one timed call, so a
    slow teacher cannot stall the job.
    """
    device = torch.device(device)
    started = time.perf_counter()
    for _ in range(warmup):
        _call(fn, example_batch_1)
        _sync(device)
        if time.perf_counter() - started > budget_s / 2:
            break
    times: list[float] = []
    for _ in range(max(repeats, 1)):
        _sync(device)
        t0 = time.perf_counter()
        _call(fn, example_batch_1)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s:
            break
    return statistics.median(times) * 1000.0


def measure_throughput(
    fn: Callable[[Any], Any],
    example_large_batch: Batch,
    device: torch.device | str,
    min_seconds: float = 1.0,
    max_calls: int = 1000,
) -> float:
    """Samples per second of ``fn`` on a large batch, timed over at least ``min_seconds``.

    One untimed warm-up call first; then calls repeat until ``min_seconds`` have
    passed (at least one call, at most ``max_calls``).
    """
    device = torch.device(device)
    n = _batch_size(example_large_batch)
    _call(fn, example_large_batch)
    _sync(device)
    calls = 0
    t0 = time.perf_counter()
    elapsed = 0.0
    while calls < max(max_calls, 1):
        _call(fn, example_large_batch)
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
    return n * calls / max(elapsed, 1e-9)


def measure_speed(
    fn: Callable[[Any], Any], tensors: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, float]:
    """``latency_ms`` on the first row and ``throughput`` on up to 256 rows of ``tensors``."""
    one = {name: value[:1].to(device) for name, value in tensors.items()}
    many = {name: value[:256].to(device) for name, value in tensors.items()}
    return {
        "latency_ms": measure_latency(fn, one, device),
        "throughput": measure_throughput(fn, many, device),
    }


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes of ``module``'s state dict: its weights and buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# --------------------------------------------------------------------------- metrics.json


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if not isinstance(numerator, int | float) or not isinstance(denominator, int | float):
        return None
    if numerator <= 0 or denominator <= 0:
        return None
    return _num(numerator / denominator)


def _verdict(
    task: str, student: Mapping[str, Any], baseline: Mapping[str, Any]
) -> tuple[bool | None, str]:
    metric, higher_is_better = PRIMARY_METRIC[task]
    distilled, labels_only = student.get(metric), baseline.get(metric)
    if distilled is None or labels_only is None:
        return None, f"no verdict: {metric} is missing for the distilled or labels-only student"
    if higher_is_better:
        helped = distilled > labels_only + VERDICT_TOLERANCE
    else:
        helped = distilled < labels_only * (1 - VERDICT_TOLERANCE) - 1e-12
    if helped:
        return True, (
            f"distillation helped: the distilled student scored {distilled:.4g} {metric} "
            f"vs {labels_only:.4g} for the labels-only student"
        )
    return False, (
        f"distillation did not help: the labels-only student scored {labels_only:.4g} {metric} "
        f"vs {distilled:.4g} for the distilled student"
    )


def _plain(obj: Any) -> Any:
    """Numpy scalars and arrays as plain Python values, so the object is JSON-able."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        return _num(obj)
    return obj


#: The keys :func:`build_metrics` computes (``extra`` may not set them), in schema order.
_COMPUTED_KEYS = (
    "task",
    "teacher",
    "student",
    "fidelity",
    "compression",
    "compression_basis",
    "speedup",
    "baseline",
    "distillation_helped",
    "verdict",
)


def build_metrics(
    task: str,
    teacher: Mapping[str, Any],
    student: Mapping[str, Any],
    fidelity: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` object, validated against :data:`METRICS_SCHEMA`.

    ``teacher``, ``student`` and ``baseline`` each hold the task metrics plus
    ``parameters``, ``bytes``, ``latency_ms`` and ``throughput``. ``extra`` must give
    ``split`` (``{"validation_rows", "reference"}``) and ``device``; ``partial``
    defaults to False and further keys (e.g. ``training``) are copied as they are.
    ``compression`` is teacher / student parameters, or bytes when the teacher has no
    parameters (``compression_basis`` says which); ``speedup`` is teacher / student
    batch-1 latency. Without a baseline, ``baseline``, ``distillation_helped`` and
    ``verdict`` are null.
    """
    extra = _plain(dict(extra or {}))
    teacher, student, fidelity = _plain(teacher), _plain(student), _plain(fidelity)
    baseline = _plain(baseline) if baseline is not None else None
    clash = extra.keys() & set(_COMPUTED_KEYS)
    if clash:
        raise ValueError(f"extra may not set computed keys: {sorted(clash)}")
    fidelity_keys = {k: fidelity.get(k) for k in FIDELITY_KEYS}
    fidelity_keys.update({k: v for k, v in fidelity.items() if k not in fidelity_keys})

    compression = _ratio(teacher.get("parameters"), student.get("parameters"))
    basis: str | None = "parameters" if compression is not None else None
    if compression is None:
        compression = _ratio(teacher.get("bytes"), student.get("bytes"))
        basis = "bytes" if compression is not None else None

    helped: bool | None = None
    verdict: str | None = None
    if baseline is not None:
        helped, verdict = _verdict(task, student, baseline)

    metrics: dict[str, Any] = {
        "task": task,
        "teacher": dict(teacher),
        "student": dict(student),
        "fidelity": fidelity_keys,
        "compression": compression,
        "compression_basis": basis,
        "speedup": _ratio(teacher.get("latency_ms"), student.get("latency_ms")),
        "baseline": dict(baseline) if baseline is not None else None,
        "distillation_helped": helped,
        "verdict": verdict,
        "partial": False,
        **extra,
    }
    validate_metrics(metrics)
    return metrics


# --------------------------------------------------------------------------- schema

_NUMBER_OR_NULL: dict[str, Any] = {"type": ["number", "null"]}


def _side_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(SIDE_KEYS),
        "properties": {
            "parameters": {"type": "integer", "minimum": 0},
            "bytes": {"type": "integer", "minimum": 0},
            "latency_ms": {"type": ["number", "null"], "minimum": 0},
            "throughput": {"type": ["number", "null"], "minimum": 0},
            **{m: _NUMBER_OR_NULL for keys in TASK_METRICS.values() for m in keys},
        },
        "additionalProperties": True,
    }


def _task_rule(task: str) -> dict[str, Any]:
    keys = list(TASK_METRICS[task])
    return {
        "if": {"properties": {"task": {"const": task}}},
        "then": {
            "properties": {
                "teacher": {"required": keys},
                "student": {"required": keys},
                "baseline": {"required": keys},
            }
        },
    }


#: JSON Schema (draft 2020-12) of ``metrics.json``; the service tests reuse it.
METRICS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Distillery metrics.json",
    "type": "object",
    "required": [*_COMPUTED_KEYS, "split", "device", "partial"],
    "properties": {
        "task": {"enum": list(TASKS)},
        "teacher": _side_schema(),
        "student": _side_schema(),
        "baseline": {**_side_schema(), "type": ["object", "null"]},
        "fidelity": {
            "type": "object",
            "required": list(FIDELITY_KEYS),
            "properties": {k: _NUMBER_OR_NULL for k in FIDELITY_KEYS},
            "additionalProperties": True,
        },
        "compression": {"type": ["number", "null"], "minimum": 0},
        "compression_basis": {"enum": ["parameters", "bytes", None]},
        "speedup": {"type": ["number", "null"], "minimum": 0},
        "distillation_helped": {"type": ["boolean", "null"]},
        "verdict": {"type": ["string", "null"]},
        "split": {
            "type": "object",
            "required": ["validation_rows", "reference"],
            "properties": {
                "validation_rows": {"type": "integer", "minimum": 0},
                "reference": {"enum": ["labels", "teacher"]},
            },
        },
        "device": {"type": "string"},
        "partial": {"type": "boolean"},
    },
    "additionalProperties": True,
    "allOf": [_task_rule(t) for t in TASKS],
}


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
}


def _schema_errors(value: Any, schema: Mapping[str, Any], at: str) -> list[str]:
    """JSON Schema semantics for the keywords METRICS_SCHEMA uses (no jsonschema here)."""
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            return [f"{at}: expected {' or '.join(types)}, got {value!r}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{at}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: expected one of {schema['enum']}, got {value!r}")
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        errors.append(f"{at}: {value} is below {schema['minimum']}")
    if isinstance(value, dict):
        errors += [f"{at}.{k}: required" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key in value:
                errors += _schema_errors(value[key], sub, f"{at}.{key}")
        if schema.get("additionalProperties") is False:
            errors += [f"{at}.{k}: not allowed" for k in value if k not in props]
    for sub in schema.get("allOf", []):
        errors += _schema_errors(value, sub, at)
    if "if" in schema and not _schema_errors(value, schema["if"], at):
        errors += _schema_errors(value, schema.get("then", {}), at)
    return errors


def validate_metrics(obj: Any) -> None:
    """Raise ValueError naming every place where ``obj`` does not match METRICS_SCHEMA."""
    errors = _schema_errors(obj, METRICS_SCHEMA, "metrics")
    if errors:
        raise ValueError("metrics.json does not match its schema: " + "; ".join(errors))
