"""``model_card.md``: what was distilled, how, the results beside the teacher's, the limits.

Each section is one function returning its lines; :func:`write_model_card` joins
them with a blank line between sections.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

_METRIC_LABELS = {
    "accuracy": "accuracy",
    "top5_accuracy": "top-5 accuracy",
    "f1_macro": "F1 (macro)",
    "mae": "MAE",
    "mse": "MSE",
    "r2": "R²",
    "cosine": "cosine similarity",
    "parameters": "parameters",
    "bytes": "bytes",
    "latency_ms": "latency, batch 1 (ms)",
    "throughput": "throughput (samples/s)",
}
_TASK_METRICS = {
    "classification": ["accuracy", "top5_accuracy", "f1_macro"],
    "regression": ["mae", "mse", "r2"],
    "embedding": ["cosine"],
}
_SIZE_AND_SPEED = ["parameters", "bytes", "latency_ms", "throughput"]
_FIDELITY_LABELS = {
    "agreement": "agreement (same top class)",
    "kl_divergence": "KL(teacher ‖ student), T=1",
    "output_mse": "output MSE",
    "r2_to_teacher": "R² to the teacher's outputs",
    "cosine": "cosine similarity to the teacher",
}
_DEFAULT_FORMATS = ["onnx", "safetensors"]


def _cell(value: Any) -> str:
    """A number or word as the card shows it: thousands separated, 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _title(
    task: str, teacher_signature: Mapping[str, Any], student_config: Mapping[str, Any]
) -> list[str]:
    teacher_architecture = teacher_signature.get("architecture")
    return [
        "# Distilled student model",
        "",
        f"A student (`{student_config.get('architecture', 'unknown')}`) distilled for "
        f"**{task}** from a teacher in `{teacher_signature.get('format', 'unknown')}` format"
        f"{f' (`{teacher_architecture}`)' if teacher_architecture else ''}.",
    ]


def _what_was_distilled(
    metrics: Mapping[str, Any],
    teacher_signature: Mapping[str, Any],
    student_config: Mapping[str, Any],
) -> list[str]:
    teacher = metrics.get("teacher") or {}
    student = metrics.get("student") or {}
    teacher_architecture = teacher_signature.get("architecture")
    teacher_format = teacher_signature.get("format", "–")
    output_dim = teacher_signature.get("output_dim") or teacher_signature.get("num_classes")
    teacher_inputs = ", ".join(
        str(entry.get("name")) for entry in teacher_signature.get("inputs", [])
    )
    teacher_parameters = teacher.get("parameters", teacher_signature.get("parameters"))
    student_parameters = student.get("parameters", student_config.get("parameters"))
    return [
        "## What was distilled",
        "",
        "| | teacher | student |",
        "| --- | --- | --- |",
        f"| format / architecture | {teacher_format}"
        f"{f' / {teacher_architecture}' if teacher_architecture else ''} | "
        f"{student_config.get('architecture', 'unknown')} |",
        f"| parameters | {_cell(teacher_parameters)} | {_cell(student_parameters)} |",
        f"| bytes | {_cell(teacher.get('bytes', teacher_signature.get('bytes')))} | "
        f"{_cell(student.get('bytes'))} |",
        f"| inputs | {teacher_inputs} | {', '.join(student_config.get('input_names', []))} |",
        f"| output width | {_cell(output_dim)} ({_cell(teacher_signature.get('output_kind'))}) | "
        f"{_cell(student_config.get('output_dim') or output_dim)} |",
    ]


def _how(task: str, metrics: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    method = spec.get("method") or {}
    training = spec.get("training") or {}
    training_run = metrics.get("training") or {}
    method_name = training_run.get("method") or method.get("name") or "default for the task"
    lines = ["## How", "", f"- method: {method_name}"]
    if task == "classification":
        lines += [
            f"- temperature: {_cell(method.get('temperature'))}",
            f"- alpha (weight of the teacher's soft targets): {_cell(method.get('alpha'))}",
        ]
    lines.append(
        f"- epochs: {_cell(training.get('epochs'))}, batch size "
        f"{_cell(training.get('batch_size'))}, learning rate "
        f"{_cell(training.get('learning_rate'))}, optimizer {_cell(training.get('optimizer'))}"
    )
    if training_run:
        lines.append(
            f"- trained {_cell(training_run.get('steps'))} steps; "
            f"stopped: {_cell(training_run.get('stop_reason'))}"
        )
    if metrics.get("partial"):
        lines.append("- **partial**: training stopped at its time budget before finishing.")
    return lines


def _results(task: str, metrics: Mapping[str, Any]) -> list[str]:
    split = metrics.get("split") or {}
    baseline = metrics.get("baseline")
    if split.get("reference", "labels") == "labels":
        reference = "the dataset's labels"
    else:
        reference = (
            "the teacher's outputs (the held-out rows have no labels, so the teacher's "
            "scores measure agreement with the teacher, not correctness)"
        )
    columns = ["teacher", "student"] + (["labels-only baseline"] if baseline else [])
    sides = [metrics.get("teacher") or {}, metrics.get("student") or {}]
    sides += [baseline] if baseline else []
    lines = [
        "## Results",
        "",
        f"Measured on {_cell(split.get('validation_rows'))} held-out rows against {reference}, "
        f"on {_cell(metrics.get('device'))}.",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for key in [*_TASK_METRICS.get(task, []), *_SIZE_AND_SPEED]:
        cells = " | ".join(_cell(side.get(key)) for side in sides)
        lines.append(f"| {_METRIC_LABELS[key]} | {cells} |")
    return lines


def _fidelity(metrics: Mapping[str, Any]) -> list[str]:
    fidelity = metrics.get("fidelity") or {}
    basis = metrics.get("compression_basis")
    lines = ["### Fidelity to the teacher", "", "| measure | value |", "| --- | --- |"]
    lines += [
        f"| {_FIDELITY_LABELS.get(measure, measure)} | {_cell(value)} |"
        for measure, value in fidelity.items()
        if value is not None
    ]
    return [
        *lines,
        "",
        f"- compression: {_cell(metrics.get('compression'))}×{f' (by {basis})' if basis else ''}",
        f"- speedup (batch-1 latency): {_cell(metrics.get('speedup'))}×",
    ]


def _verdict(metrics: Mapping[str, Any]) -> list[str]:
    """Whether distillation beat the labels-only baseline; nothing without a baseline run."""
    if not metrics.get("verdict"):
        return []
    return ["### Did distillation help?", "", str(metrics["verdict"]) + "."]


def _intended_use() -> list[str]:
    return [
        "## Intended use and limitations",
        "",
        "- A smaller, faster stand-in for the teacher on inputs like the transfer set.",
        "- The student learned from the teacher's outputs on the transfer set only: it "
        "inherits the teacher's errors and biases, and is not validated outside the "
        "distribution of that data.",
        "- The numbers above come from one held-out split of the transfer set; they are "
        "estimates, not guarantees.",
        "- Inputs must be prepared exactly as for the teacher (same features, scaling, "
        "image size or tokenizer).",
    ]


def _files(spec: Mapping[str, Any], student_config: Mapping[str, Any]) -> list[str]:
    formats = (spec.get("export") or {}).get("formats") or _DEFAULT_FORMATS
    lines = ["## Files", ""]
    if "onnx" in formats:
        lines.append(
            "- `student.onnx`: inputs "
            + ", ".join(f"`{name}`" for name in student_config.get("input_names", []))
            + ", output `outputs` (dynamic batch axis)."
        )
    if "safetensors" in formats:
        lines.append("- `student.safetensors`: the weights.")
    return [
        *lines,
        "- `student_config.json`: the configuration that rebuilds the architecture.",
        "- `metrics.json`: every number above; `training_curves.png`: the training run.",
    ]


def write_model_card(
    path: str | Path,
    metrics: Mapping[str, Any],
    spec: Mapping[str, Any],
    teacher_signature: Mapping[str, Any],
    student_config: Mapping[str, Any],
) -> Path:
    """Write ``model_card.md``: what was distilled, how, the results and the limits.

    ``metrics`` is the content of ``metrics.json``, ``spec`` the job spec as JSON,
    ``teacher_signature`` the inspected teacher and ``student_config`` the student's
    ``config``; a missing key shows as "–" rather than failing.
    """
    task = str(metrics.get("task", spec.get("task") or "unknown"))
    sections = [
        _title(task, teacher_signature, student_config),
        _what_was_distilled(metrics, teacher_signature, student_config),
        _how(task, metrics, spec),
        _results(task, metrics),
        _fidelity(metrics),
        _verdict(metrics),
        _intended_use(),
        _files(spec, student_config),
    ]
    path = Path(path)
    path.write_text("\n\n".join("\n".join(lines) for lines in sections if lines) + "\n")
    return path
