"""``metrics.json``: :func:`build_metrics` assembles it, :data:`METRICS_SCHEMA` describes it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from worker.engine.evaluation.metrics import FIDELITY_KEYS, TASK_METRICS, TASKS, json_number
from worker.engine.evaluation.verdict import decide

SIDE_KEYS = ("parameters", "bytes", "latency_ms", "throughput")

#: The metric the baseline comparison uses, and whether higher is better.
PRIMARY_METRIC: dict[str, tuple[str, bool]] = {
    "classification": ("accuracy", True),
    "regression": ("mse", False),
    "embedding": ("cosine", True),
}

#: Where a job that keeps its student may be cancelled (``cancelled_during``): training (the
#: student ladder included) or the labels-only baseline, whose student is still evaluated, and
#: the export or the evaluation, whose student is not (``evaluated`` false).
CANCEL_STAGES = ("training", "baseline", "export", "evaluation")

#: Distillation "helped" only when it beats the baseline by more than this: absolute for
#: bounded scores (accuracy, cosine), relative for errors (mse). Smaller gaps are noise.
BASELINE_TOLERANCE = 0.005

# --------------------------------------------------------------------------- metrics.json


def _ratio(numerator: Any, denominator: Any) -> float | None:
    if not isinstance(numerator, int | float) or not isinstance(denominator, int | float):
        return None
    if numerator <= 0 or denominator <= 0:
        return None
    return json_number(numerator / denominator)


def _baseline_comparison(
    task: str, student: Mapping[str, Any], baseline: Mapping[str, Any]
) -> tuple[bool | None, str]:
    """Whether distillation beat the labels-only student, and the sentence that says so."""
    metric, higher_is_better = PRIMARY_METRIC[task]
    distilled, labels_only = student.get(metric), baseline.get(metric)
    if distilled is None or labels_only is None:
        return None, f"no comparison: {metric} is missing for the distilled or labels-only student"
    if higher_is_better:
        helped = distilled > labels_only + BASELINE_TOLERANCE
    else:
        helped = distilled < labels_only * (1 - BASELINE_TOLERANCE) - 1e-12
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
        return json_number(obj)
    return obj


#: The keys :func:`build_metrics` computes (``extra`` may not set them), in schema order.
_COMPUTED_KEYS = (
    "task",
    "teacher",
    "student",
    "fidelity",
    "compression",
    "compression_basis",
    "compression_by_parameters",
    "compression_by_file_bytes",
    "speedup",
    "baseline",
    "distillation_helped",
    "baseline_comparison",
    "verdict",
)
#: Keys ``extra`` must give.
_GIVEN_KEYS = ("split", "device", "intervals", "runtime")
#: Computed too, but optional in the schema: quantized students, null when none was asked.
_QUANTIZED_KEY = "quantized"


def _compressions(teacher: Mapping[str, Any], student: Mapping[str, Any]) -> dict[str, Any]:
    by_parameters = _ratio(teacher.get("parameters"), student.get("parameters"))
    by_bytes = _ratio(teacher.get("bytes"), student.get("bytes"))
    return {
        # Parameters where the teacher has any, else bytes (tree ensembles): as before.
        "compression": by_parameters if by_parameters is not None else by_bytes,
        "compression_basis": (
            "parameters" if by_parameters is not None else "bytes" if by_bytes is not None else None
        ),
        "compression_by_parameters": by_parameters,
        "compression_by_file_bytes": _ratio(teacher.get("file_bytes"), student.get("file_bytes")),
    }


def _quantized_entry(
    task: str,
    teacher: Mapping[str, Any],
    student: Mapping[str, Any],
    entry: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """One quantized student with its comparisons to the teacher and the fp32 student."""
    if entry is None:
        return None
    metric = PRIMARY_METRIC[task][0]
    fidelity = dict(entry.get("fidelity") or {})
    quantized, fp32 = entry.get(metric), student.get(metric)
    delta = (
        json_number(quantized - fp32)
        if isinstance(quantized, int | float) and isinstance(fp32, int | float)
        else None
    )
    return {
        **entry,
        "fidelity": {**{k: fidelity.get(k) for k in FIDELITY_KEYS}, **fidelity},
        "compression_by_file_bytes": _ratio(teacher.get("file_bytes"), entry.get("file_bytes")),
        "file_bytes_vs_fp32": _ratio(student.get("file_bytes"), entry.get("file_bytes")),
        "primary_metric": metric,
        "metric_delta_vs_fp32": delta,
        "speedup_vs_fp32": _ratio(
            student.get("onnxruntime_latency_ms"), entry.get("onnxruntime_latency_ms")
        ),
    }


def build_metrics(
    task: str,
    teacher: Mapping[str, Any],
    student: Mapping[str, Any],
    fidelity: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    accept: Mapping[str, Any] | None = None,
    quantized: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """The ``metrics.json`` object, validated against :data:`METRICS_SCHEMA`.

    ``teacher``, ``student`` and ``baseline`` each hold the task metrics plus
    ``parameters``, ``bytes``, ``latency_ms`` and ``throughput`` (and ``file_bytes``,
    the size of the file run). ``extra`` must give ``split``, ``device``,
    ``intervals`` and ``runtime``; ``partial`` defaults to False and further keys
    (e.g. ``training``, ``provenance``) are copied as they are.

    Computed: ``compression`` (teacher / student parameters, or bytes when the teacher
    has none; ``compression_basis`` says which), ``compression_by_parameters`` and
    ``compression_by_file_bytes``; ``speedup`` (teacher / student batch-1 latency);
    with a baseline, ``distillation_helped`` and ``baseline_comparison`` (text);
    ``quantized``: each quantized student of ``quantized`` (``int8``: its task metrics,
    ``file_bytes``, ``fidelity``, ``onnxruntime_latency_ms`` and ``onnxruntime_throughput``;
    None where its quantization failed) with ``compression_by_file_bytes`` (teacher file /
    quantized file), ``file_bytes_vs_fp32``, ``metric_delta_vs_fp32`` (quantized minus
    fp32 student, in the primary metric) and ``speedup_vs_fp32`` (onnxruntime batch-1
    latency), or None when none was asked; and ``verdict``
    (:func:`~worker.engine.evaluation.verdict.decide` under ``accept``, whose missing keys
    take :class:`~worker.engine.spec.AcceptSpec`'s defaults); each quantized student gets
    its own ``verdict``, read as if it were the student (:func:`quantized_view`), and
    the ``compression`` that verdict counts.
    ``evaluated`` is True: a
    ``metrics.json`` of a student left unevaluated (``evaluated`` false, see
    :data:`METRICS_SCHEMA`) is not built here.
    """
    from worker.engine.spec import AcceptSpec

    extra = _plain(dict(extra or {}))
    teacher, student, fidelity = _plain(teacher), _plain(student), _plain(fidelity)
    baseline = _plain(baseline) if baseline is not None else None
    clash = extra.keys() & {*_COMPUTED_KEYS, _QUANTIZED_KEY}
    if clash:
        raise ValueError(f"extra may not set computed keys: {sorted(clash)}")
    fidelity_keys = {k: fidelity.get(k) for k in FIDELITY_KEYS}
    fidelity_keys.update({k: v for k, v in fidelity.items() if k not in fidelity_keys})
    helped, comparison = (
        _baseline_comparison(task, student, baseline) if baseline is not None else (None, None)
    )
    metrics: dict[str, Any] = {
        "task": task,
        "teacher": dict(teacher),
        "student": dict(student),
        "fidelity": fidelity_keys,
        **_compressions(teacher, student),
        "speedup": _ratio(teacher.get("latency_ms"), student.get("latency_ms")),
        "baseline": dict(baseline) if baseline is not None else None,
        "distillation_helped": helped,
        "baseline_comparison": comparison,
        "partial": False,
        "evaluated": True,
        # The student ladder (worker.engine.ladder) when one ran; the pipeline sets it.
        "ladder": None,
        **extra,
        _QUANTIZED_KEY: (
            {
                name: _quantized_entry(task, teacher, student, entry)
                for name, entry in _plain(dict(quantized)).items()
            }
            if quantized is not None
            else None
        ),
    }
    criteria = AcceptSpec.model_validate(dict(accept or {})).model_dump()
    metrics["verdict"] = decide(task, metrics, criteria)
    for entry in (metrics[_QUANTIZED_KEY] or {}).values():
        if entry is not None:
            view = quantized_view(metrics, entry)
            entry["compression"] = view["compression"]
            entry["verdict"] = decide(task, view, criteria)
    validate_metrics(metrics)
    return metrics


def quantized_view(metrics: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as they would read with the quantized file ``entry`` as the student: its
    task metrics, fidelity and onnxruntime latency; its speedup against the teacher's
    onnxruntime latency (not measured where the teacher did not run there); its
    parameters those of the fp32 student it was quantized from, its ``bytes`` its own
    weights' (where ``entry`` gives them), so a compression by bytes (a teacher without
    parameters) counts the int8 weights and one by parameters is the fp32 student's."""
    teacher, student = metrics["teacher"], metrics["student"]
    latency = entry.get("onnxruntime_latency_ms")
    metric_keys = {m for keys in TASK_METRICS.values() for m in keys}
    size = entry.get("bytes", student.get("bytes"))
    compression = metrics.get("compression")
    if metrics.get("compression_basis") == "bytes":
        compression = _ratio(teacher.get("bytes"), size)
    return {
        **metrics,
        "student": {
            **student,
            **{k: v for k, v in entry.items() if k in metric_keys},
            "latency_ms": latency,
            "file_bytes": entry.get("file_bytes"),
            "bytes": size,
        },
        "fidelity": dict(entry.get("fidelity") or {}),
        "speedup": _ratio(teacher.get("onnxruntime_latency_ms"), latency),
        "compression": compression,
        # The intervals are the fp32 student's: none is claimed for this file.
        "intervals": {},
    }


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


_ROW_COUNTS = ("train_rows", "validation_rows", "test_rows")
_RUNTIMES = ("onnxruntime", "torch")
_INTERVAL: dict[str, Any] = {
    "type": "object",
    "required": ["metric", "estimate", "low", "high"],
    "properties": {
        "metric": {"type": "string"},
        "estimate": _NUMBER_OR_NULL,
        "low": _NUMBER_OR_NULL,
        "high": _NUMBER_OR_NULL,
    },
}


#: What every quantized student carries (beside the task metrics of its task).
QUANTIZED_KEYS = (
    "file_bytes",
    "fidelity",
    "onnxruntime_latency_ms",
    "onnxruntime_throughput",
    "compression_by_file_bytes",
    "metric_delta_vs_fp32",
)


def _quantized_schema() -> dict[str, Any]:
    return {
        "type": ["object", "null"],
        "required": list(QUANTIZED_KEYS),
        "properties": {
            "file_bytes": {"type": "integer", "minimum": 0},
            # Its weights alone, as the fp32 student's ``bytes`` (state dict) count them.
            "bytes": {"type": "integer", "minimum": 0},
            "compression": {"type": ["number", "null"], "minimum": 0},
            "fidelity": {
                "type": "object",
                "required": list(FIDELITY_KEYS),
                "properties": {k: _NUMBER_OR_NULL for k in FIDELITY_KEYS},
            },
            "onnxruntime_latency_ms": {"type": ["number", "null"], "minimum": 0},
            "onnxruntime_throughput": {"type": ["number", "null"], "minimum": 0},
            "compression_by_file_bytes": {"type": ["number", "null"], "minimum": 0},
            "file_bytes_vs_fp32": {"type": ["number", "null"], "minimum": 0},
            "metric_delta_vs_fp32": _NUMBER_OR_NULL,
            "speedup_vs_fp32": {"type": ["number", "null"], "minimum": 0},
            "method": {"enum": ["dynamic", "static"]},
            # The verdict on this file as the student (see quantized_view).
            "verdict": {"type": "object", "required": ["deployable", "reasons"]},
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
                "quantized": {
                    "properties": {"int8": {"required": keys}},
                },
            }
        },
    }


#: One rung of the student ladder, judged on the validation rows.
_RUNG: dict[str, Any] = {
    "type": "object",
    "required": [
        "parameters",
        "file_bytes",
        "onnxruntime_latency_ms",
        "validation",
        "steps",
        "seconds",
        "met_criteria",
        "reasons",
    ],
    "properties": {
        # The rung's size under the section's ``knob``: an MLP's, a CNN's, or a transformers
        # encoder's [layers, width, feed-forward units].
        "hidden_sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "channels": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "encoder": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 3,
            "maxItems": 3,
        },
        "parameters": {"type": "integer", "minimum": 0},
        "file_bytes": {"type": "integer", "minimum": 0},
        "onnxruntime_latency_ms": {"type": ["number", "null"], "minimum": 0},
        "latency_ms": {"type": ["number", "null"], "minimum": 0},
        "validation": {
            "type": "object",
            "required": ["metric", "fidelity"],
            "properties": {
                "metric": {
                    "type": "object",
                    "required": ["name", "value"],
                    "properties": {"name": {"type": "string"}, "value": _NUMBER_OR_NULL},
                },
                "fidelity": {
                    "type": "object",
                    "required": ["name", "value"],
                    "properties": {"name": {"type": "string"}, "value": _NUMBER_OR_NULL},
                },
            },
        },
        "steps": {"type": "integer", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
        # Met on the evidence: every criterion met and none left unsettled by the rows.
        "met_criteria": {"type": "boolean"},
        "reasons": {"type": "array"},
        # What the validation rows cannot settle; absent in files written before.
        "caveats": {"type": "array", "items": {"type": "string"}},
    },
}
#: ``ladder``: null when one student was trained; the rungs, the chosen one's index and the
#: split it was chosen on (always ``validation``) when a ladder ran. Optional, for
#: metrics.json files written before it.
LADDER_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["rungs", "chosen", "basis", "met_criteria"],
    "properties": {
        "rungs": {"type": "array", "items": _RUNG},
        "chosen": {"type": "integer", "minimum": 0},
        "basis": {"const": "validation"},
        "met_criteria": {"type": "boolean"},
        # What the rungs vary; absent in files written before CNN ladders (hidden_sizes).
        "knob": {"enum": ["hidden_sizes", "channels", "encoder"]},
        # Which file of the chosen rung is deployed (int8 only when its int8 file met them).
        "chosen_precision": {"enum": ["fp32", "int8"]},
        "planned": {"type": "array", "items": {"type": "array"}},
    },
}

#: ``evaluated`` false: a student cancelled during its export or evaluation, kept unevaluated.
#: Partial and not deployable, with how it trained and its row counts, and no figure of the
#: test rows; every other ``metrics.json`` (``evaluated`` true or absent) has them all.
_UNEVALUATED: dict[str, Any] = {
    "if": {"required": ["evaluated"], "properties": {"evaluated": {"const": False}}},
    "then": {
        "required": ["training", "split", "cancelled_during"],
        "properties": {
            "partial": {"const": True},
            "verdict": {"properties": {"deployable": {"const": False}}},
            "cancelled_during": {"enum": ["export", "evaluation"]},
        },
    },
    "else": {
        "required": [*_COMPUTED_KEYS, *_GIVEN_KEYS],
        "properties": {"split": {"required": ["reference"]}},
    },
}

#: JSON Schema (draft 2020-12) of ``metrics.json``; the service tests reuse it.
METRICS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Distillery metrics.json",
    "type": "object",
    "required": ["task", "partial", "verdict"],
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
        "compression_by_parameters": {"type": ["number", "null"], "minimum": 0},
        "compression_by_file_bytes": {"type": ["number", "null"], "minimum": 0},
        "distillation_helped": {"type": ["boolean", "null"]},
        "baseline_comparison": {"type": ["string", "null"]},
        # The file ``verdict`` is about (the int8 one when the ladder chose it); optional.
        "deployed_file": {"enum": ["student.onnx", "student.int8.onnx"]},
        "verdict": {
            "type": "object",
            "required": ["deployable", "reasons", "criteria"],
            "properties": {
                "deployable": {"type": "boolean"},
                "reasons": {"type": "array"},
                "criteria": {"type": "object"},
                # What the test rows cannot settle (verdict._caveats); optional, for
                # metrics.json files written before it.
                "caveats": {"type": "array", "items": {"type": "string"}},
            },
        },
        "split": {
            "type": "object",
            "required": [*_ROW_COUNTS, "test_source"],
            "properties": {
                **{k: {"type": "integer", "minimum": 0} for k in _ROW_COUNTS},
                "test_source": {"enum": ["split", "dataset"]},
                "scored_rows": {"type": "integer", "minimum": 0},
                "reference": {"enum": ["labels", "teacher"]},
            },
        },
        "intervals": {
            "type": "object",
            "required": ["confidence", "resamples", "teacher", "student", "fidelity"],
            "properties": {
                "teacher": _INTERVAL,
                "student": _INTERVAL,
                "fidelity": _INTERVAL,
                "baseline": {**_INTERVAL, "type": ["object", "null"]},
            },
        },
        "runtime": {
            "type": "object",
            "required": ["teacher", "student", "speed"],
            "properties": {
                "teacher": {"enum": list(_RUNTIMES)},
                "student": {"enum": list(_RUNTIMES)},
                "speed": {"enum": list(_RUNTIMES)},
            },
        },
        "device": {"type": "string"},
        "partial": {"type": "boolean"},
        "evaluated": {"type": "boolean"},
        "cancelled_during": {"enum": [*CANCEL_STAGES, None]},
        "quantized": {
            "type": ["object", "null"],
            "properties": {"int8": _quantized_schema()},
            "additionalProperties": False,
        },
        "ladder": LADDER_SCHEMA,
    },
    "additionalProperties": True,
    "allOf": [*(_task_rule(t) for t in TASKS), _UNEVALUATED],
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
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += _schema_errors(item, schema["items"], f"{at}[{index}]")
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
    if "if" in schema:
        branch = "else" if _schema_errors(value, schema["if"], at) else "then"
        errors += _schema_errors(value, schema.get(branch, {}), at)
    return errors


def validate_metrics(obj: Any) -> None:
    """Raise ValueError naming every place where ``obj`` does not match METRICS_SCHEMA."""
    errors = _schema_errors(obj, METRICS_SCHEMA, "metrics") + _ladder_errors(obj)
    if errors:
        raise ValueError("metrics.json does not match its schema: " + "; ".join(errors))


def _ladder_errors(obj: Any) -> list[str]:
    """What the schema cannot say about ``ladder``: its chosen index names one of its rungs,
    and every rung gives its size under the section's ``knob``."""
    ladder = obj.get("ladder") if isinstance(obj, dict) else None
    if not isinstance(ladder, dict):
        return []
    errors = []
    rungs, chosen = ladder.get("rungs"), ladder.get("chosen")
    if isinstance(rungs, list) and isinstance(chosen, int) and not 0 <= chosen < len(rungs):
        errors.append(
            f"metrics.ladder.chosen: {chosen} is not the index of one of {len(rungs)} rungs"
        )
    knob = ladder.get("knob", "hidden_sizes")
    for index, rung in enumerate(rungs if isinstance(rungs, list) else []):
        if isinstance(rung, dict) and knob not in rung:
            errors.append(f"metrics.ladder.rungs[{index}].{knob}: required")
    return errors
