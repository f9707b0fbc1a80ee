"""``model_card.md``: the verdict first, then the figures on the test rows, how, provenance.

Each section is one function returning its lines; :func:`write_model_card` joins
them with a blank line between sections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.engine.ladder import KNOB_LABEL

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
#: The int8 file, deployed where metrics.json's ``deployed_file`` names it.
_INT8_FILE = "student.int8.onnx"


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
            f"- temperature: {_cell(training_run.get('temperature', method.get('temperature')))}",
            f"- alpha (weight of the teacher's soft targets): {_cell(method.get('alpha'))}",
        ]
    plan = training_run.get("plan") or {}
    lines.append(
        f"- epochs: {_cell(training.get('epochs'))}, batch size "
        f"{_cell(training.get('batch_size'))}, learning rate "
        f"{_cell(plan.get('learning_rate', training.get('learning_rate')))}, "
        f"optimizer {_cell(training.get('optimizer'))}"
    )
    if training_run:
        lines.append(
            f"- trained {_cell(training_run.get('steps'))} steps; "
            f"stopped: {_cell(training_run.get('stop_reason'))}"
        )
    for warning in plan.get("warnings") or []:
        lines.append(
            f"- warned before training ({_cell(warning.get('code'))}, "
            f"{_cell(warning.get('field'))}): {_cell(warning.get('message'))}"
        )
    if metrics.get("partial"):
        lines.append(f"- **partial**: {_partial(metrics)}")
    return lines


#: Why a partial student is what it is, by the stage its job was cancelled in.
_CANCELLED_DURING = {
    "training": "the job was cancelled during training; this is the best student validated "
    "before then.",
    "baseline": "the job was cancelled while the labels-only baseline trained; the student "
    "had finished training, and there is no baseline to compare it with.",
    "export": "the job was cancelled during the export; the student had finished training and "
    "its files were written whole, but it was not evaluated on the test rows.",
    "evaluation": "the job was cancelled during the evaluation, which was stopped; the student "
    "had finished training, but no figure of it on the test rows is reported.",
}


def _partial(metrics: Mapping[str, Any]) -> str:
    """Why a partial student is partial: a cancellation (and when) or the time budget."""
    if (metrics.get("training") or {}).get("stop_reason") != "cancelled":
        return (
            "training stopped at its time budget before finishing; this is the best student "
            "validated before then."
        )
    return _CANCELLED_DURING.get(
        str(metrics.get("cancelled_during")),
        "the job was cancelled before training finished; this is the best student validated "
        "before then.",
    )


def _evaluated(metrics: Mapping[str, Any]) -> bool:
    """Whether the student was evaluated on the test rows (false once cancelled before)."""
    return metrics.get("evaluated") is not False


def _not_evaluated(metrics: Mapping[str, Any]) -> list[str]:
    """In place of the results: why there are none."""
    return [
        "## Results",
        "",
        f"Not evaluated: {_partial(metrics)} The files below are the student as trained; "
        f"{_rows_trained(metrics.get('split') or {})}.",
    ]


def _decision(metrics: Mapping[str, Any]) -> list[str]:
    """Should this student be deployed: the verdict and every criterion's reason."""
    verdict = metrics.get("verdict")
    if not isinstance(verdict, Mapping):
        return []
    word = "deployable" if verdict.get("deployable") else "**not deployable**"
    lines = [f"## Verdict: {word}", ""]
    if metrics.get("deployed_file") == _INT8_FILE:
        lines += [
            f"The file to deploy is `{_INT8_FILE}`: the verdict is its, not `student.onnx`'s.",
            "",
        ]
    lines += [f"- {reason}" for reason in verdict.get("reasons", [])]
    caveats = verdict.get("caveats") or []
    if caveats:
        lines += ["", "Not settled by the test rows:", ""]
        lines += [f"- {caveat}" for caveat in caveats]
    if not _evaluated(metrics):
        return lines
    return [*lines, "", "Judged on test rows that no training step or choice saw."]


def _ladder(metrics: Mapping[str, Any]) -> list[str]:
    """The student ladder: every rung trained, its validation figures, the chosen one marked."""
    ladder = metrics.get("ladder")
    if not isinstance(ladder, Mapping) or not ladder.get("rungs"):
        return []
    chosen = ladder.get("chosen")
    rungs = list(ladder["rungs"])
    first = rungs[0].get("validation") or {}
    metric = (first.get("metric") or {}).get("name", "metric")
    fidelity = (first.get("fidelity") or {}).get("name", "fidelity")
    teacher = ladder.get("teacher") or {}
    met = ladder.get("met_criteria")
    knob = str(ladder.get("knob") or "hidden_sizes")
    label = KNOB_LABEL.get(knob, knob.replace("_", " "))
    lines = [
        "## Student ladder",
        "",
        f"{len(rungs)} student sizes were trained, smallest first, on the one teacher pass, and "
        "judged on the validation rows (never the test rows) against the criteria; "
        + (
            "the smallest that met them on the evidence of those rows was kept."
            if met
            else "**none met them** on the evidence of those rows, so the one with the best "
            "validation fidelity was kept."
        ),
        "",
        f"| | {label} | parameters | file bytes | {metric} (validation) | "
        f"{fidelity} (validation) | latency, batch 1 (ms) | steps | seconds | met criteria |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, rung in enumerate(rungs):
        validation = rung.get("validation") or {}
        mark = ""
        if index == chosen:
            mark = "**chosen (int8)**" if ladder.get("chosen_precision") == "int8" else "**chosen**"
        sizes = " × ".join(str(size) for size in rung.get(knob) or [])
        lines.append(
            f"| {mark} | {sizes} | {_cell(rung.get('parameters'))} | "
            f"{_cell(rung.get('file_bytes'))} | "
            f"{_cell((validation.get('metric') or {}).get('value'))} | "
            f"{_cell((validation.get('fidelity') or {}).get('value'))} | "
            f"{_cell(rung.get('latency_ms', rung.get('onnxruntime_latency_ms')))} | "
            f"{_cell(rung.get('steps'))} | {_cell(rung.get('seconds'))} | "
            f"{_rung_outcome(rung)} |"
        )
    lines += [
        "",
        f"The teacher on the same validation rows: {metric} "
        f"{_cell((teacher.get('metric') or {}).get('value'))}, latency "
        f"{_cell(teacher.get('latency_ms'))} ms ({_cell(teacher.get('latency_runtime'))}).",
    ]
    int8 = [(i, r["int8"]) for i, r in enumerate(rungs) if isinstance(r.get("int8"), Mapping)]
    if int8:
        lines += [
            "Each rung's int8 file was judged too (met criteria, onnxruntime latency in ms): "
            + "; ".join(
                f"rung {i}: {_cell(q.get('met_criteria'))}, "
                f"{_cell(q.get('onnxruntime_latency_ms'))}"
                for i, q in int8
            )
            + ".",
        ]
    unsettled = [(i, r) for i, r in enumerate(rungs) if _rung_outcome(r) == "unsettled"]
    if unsettled:
        lines += [
            "A rung marked unsettled met every criterion, by a margin the validation rows "
            "cannot show, and the climb went on:",
            *(f"- rung {i}: {r['caveats'][0]}" for i, r in unsettled),
        ]
    if chosen is not None and 0 <= chosen < len(rungs):
        missed = [r for r in rungs[chosen].get("reasons") or [] if str(r).startswith("missed")]
        lines += [f"- chosen rung {r}" for r in missed]
    return [*lines, "", "![student ladder](student_ladder.png)"]


def _rung_outcome(rung: Mapping[str, Any]) -> str:
    """``yes`` (met the criteria on the evidence), ``no`` (missed one) or ``unsettled``
    (met each, but some by a margin the validation rows cannot show: its caveats)."""
    if rung.get("met_criteria"):
        return "yes"
    missed = any(str(reason).startswith("missed") for reason in rung.get("reasons") or [])
    return "unsettled" if rung.get("caveats") and not missed else "no"


def _mixed(split: Mapping[str, Any]) -> str:
    """ " (and N rows mixed from them, labelled by the teacher)", where mixup added rows."""
    mixed = split.get("mixed_rows") or 0
    return f" (with {mixed} rows mixed from them, labelled by the teacher)" if mixed else ""


def _rows_trained(split: Mapping[str, Any]) -> str:
    return (
        f"{_cell(split.get('train_rows'))} rows trained{_mixed(split)} and "
        f"{_cell(split.get('validation_rows'))} validated, "
        f"{_cell(split.get('test_rows'))} test rows left unscored"
    )


def _rows(split: Mapping[str, Any]) -> str:
    source = (
        "a test set given with the job"
        if split.get("test_source") == "dataset"
        else "a test split of the transfer set"
    )
    return (
        f"{_cell(split.get('test_rows'))} test rows ({source}; "
        f"{_cell(split.get('scored_rows', split.get('test_rows')))} scored), never used to "
        f"train or to choose; {_cell(split.get('train_rows'))} rows trained{_mixed(split)} and "
        f"{_cell(split.get('validation_rows'))} validated (early stopping, best step)"
    )


def _interval_lines(metrics: Mapping[str, Any]) -> list[str]:
    intervals = metrics.get("intervals") or {}
    lines = []
    for side in ("teacher", "student", "baseline", "fidelity"):
        entry = intervals.get(side)
        if isinstance(entry, Mapping):
            lines.append(
                f"- {side} {entry.get('metric')}: {_cell(entry.get('estimate'))} "
                f"[{_cell(entry.get('low'))}, {_cell(entry.get('high'))}]"
            )
    if not lines:
        return []
    head = (
        f"{round(100 * float(intervals.get('confidence', 0.95)))}% bootstrap intervals "
        f"({_cell(intervals.get('resamples'))} resamples of the test rows):"
    )
    return ["", head, "", *lines]


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
        f"Measured on {_rows(split)}, against {reference}, on {_cell(metrics.get('device'))}. "
        f"{_runtimes(metrics)}",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for key in [*_TASK_METRICS.get(task, []), *_SIZE_AND_SPEED]:
        cells = " | ".join(_cell(side.get(key)) for side in sides)
        lines.append(f"| {_METRIC_LABELS[key]} | {cells} |")
    return lines + _interval_lines(metrics)


def _runtimes(metrics: Mapping[str, Any]) -> str:
    runtime = metrics.get("runtime") or {}
    if not runtime:
        return ""
    return (
        f"Outputs computed in {_cell(runtime.get('teacher'))} (teacher) and "
        f"{_cell(runtime.get('student'))} (student); latency and throughput in "
        f"{_cell(runtime.get('speed'))}"
        + (
            f" with {_cell(runtime.get('onnxruntime_threads'))} threads"
            if runtime.get("speed") == "onnxruntime"
            else ""
        )
        + "."
    )


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
        f"- compression by parameters: {_cell(metrics.get('compression_by_parameters'))}×; "
        f"by file bytes: {_cell(metrics.get('compression_by_file_bytes'))}×",
        f"- speedup (batch-1 latency): {_cell(metrics.get('speedup'))}×",
    ]


def _quantized(task: str, metrics: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    """The int8 student beside the fp32 one; nothing when the spec asked for none."""
    asked = (spec.get("export") or {}).get("quantize") or []
    if "int8" not in asked:
        return []
    head = ["### int8 student", ""]
    entry = (metrics.get("quantized") or {}).get("int8")
    if not isinstance(entry, Mapping):
        return [
            *head,
            "int8 quantization was asked for but failed (see the job's warnings): there is "
            "no `student.int8.onnx`.",
        ]
    student = metrics.get("student") or {}
    metric = str(entry.get("primary_metric") or (_TASK_METRICS.get(task) or ["accuracy"])[0])
    label = _METRIC_LABELS.get(metric, metric)
    fidelity = entry.get("fidelity") or {}
    measure = "agreement" if fidelity.get("agreement") is not None else "cosine"
    what = "int8 weights and activations" if entry.get("method") == "static" else "int8 weights"
    return [
        *head,
        f"`student.int8.onnx` ({_cell(entry.get('method'))} quantization, {what}): "
        f"{_cell(entry.get('file_bytes'))} bytes vs {_cell(student.get('file_bytes'))} for "
        f"`student.onnx` ({_cell(entry.get('file_bytes_vs_fp32'))}× smaller, "
        f"{_cell(entry.get('compression_by_file_bytes'))}× smaller than the teacher's file); "
        f"{label} {_cell(entry.get(metric))} vs {_cell(student.get(metric))} "
        f"(change {_cell(entry.get('metric_delta_vs_fp32'))}); "
        f"{_FIDELITY_LABELS.get(measure, measure)} {_cell(fidelity.get(measure))}; "
        f"onnxruntime latency, batch 1: {_cell(entry.get('onnxruntime_latency_ms'))} ms vs "
        f"{_cell(student.get('onnxruntime_latency_ms'))} ms "
        f"({_cell(entry.get('speedup_vs_fp32'))}× speedup), on the same test rows."
        + (
            f" Its weights take {_cell(entry['bytes'])} bytes: compression "
            f"{_cell(entry.get('compression'))}× as its verdict counts it."
            if entry.get("bytes") is not None
            else ""
        ),
    ]


def _baseline_comparison(metrics: Mapping[str, Any]) -> list[str]:
    """Whether distillation beat the labels-only baseline; nothing without a baseline run."""
    if not metrics.get("baseline_comparison"):
        return []
    return ["### Did distillation help?", "", str(metrics["baseline_comparison"]) + "."]


def _provenance(metrics: Mapping[str, Any]) -> list[str]:
    provenance = metrics.get("provenance") or {}
    if not provenance:
        return []
    lines = ["## Provenance", ""]
    lines += [
        f"- {key}: `{_cell(value)}`"
        for key, value in provenance.items()
        if key != "spec" and value is not None
    ]
    if provenance.get("spec") is not None:
        spec = json.dumps(provenance["spec"], indent=2, sort_keys=True)
        lines += ["", "The job spec:", "", "```json", spec, "```"]
    return lines


def _curves(metrics: Mapping[str, Any]) -> list[str]:
    best = (metrics.get("training") or {}).get("best_step")
    return [
        "## Training curves",
        "",
        "![training curves](training_curves.png)",
        "",
        f"The student was kept from step {_cell(best)} (dashed line), chosen on the validation "
        "rows; dotted lines are the teacher's own score.",
    ]


def _intended_use(metrics: Mapping[str, Any]) -> list[str]:
    verdict = metrics.get("verdict")
    deployable = isinstance(verdict, Mapping) and verdict.get("deployable")
    if deployable:
        use = (
            "- A stand-in for the teacher on inputs like the transfer set, within the criteria "
            "of the verdict above."
        )
    elif not _evaluated(metrics):
        use = "- Not a stand-in for the teacher: its job was cancelled before it was evaluated."
    elif (metrics.get("training") or {}).get("stop_reason") == "cancelled":
        use = "- Not a stand-in for the teacher: its job was cancelled (see the verdict)."
    else:
        use = "- Not a stand-in for the teacher: it misses the criteria named in the verdict."
    estimates = (
        [
            "- The numbers above come from one set of test rows; they are estimates (see the "
            "intervals), not guarantees."
        ]
        if _evaluated(metrics)
        else []
    )
    return [
        "## Intended use and limitations",
        "",
        use,
        "- The student learned from the teacher's outputs on the transfer set only: it "
        "inherits the teacher's errors and biases, and is not validated outside the "
        "distribution of that data.",
        *estimates,
        "- Inputs must be prepared exactly as for the teacher (same features, scaling, "
        "image size or tokenizer).",
    ]


def _files(
    spec: Mapping[str, Any], student_config: Mapping[str, Any], metrics: Mapping[str, Any]
) -> list[str]:
    formats = (spec.get("export") or {}).get("formats") or _DEFAULT_FORMATS
    int8_deployed = metrics.get("deployed_file") == _INT8_FILE
    lines = ["## Files", ""]
    if "onnx" in formats:
        lines.append(
            "- `student.onnx`: inputs "
            + ", ".join(f"`{name}`" for name in student_config.get("input_names", []))
            + ", output `outputs` (dynamic batch axis)"
            + ("; the fp32 file the int8 one was quantized from." if int8_deployed else ".")
        )
    if "onnx" in formats and "int8" in ((spec.get("export") or {}).get("quantize") or []):
        lines.append(
            f"- `{_INT8_FILE}`: the same inputs and outputs, int8 weights"
            + ("; **the file to deploy** (the verdict is its)." if int8_deployed else ".")
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
    """Write ``model_card.md``: the verdict, the results on the test rows, how, provenance.

    ``metrics`` is the content of ``metrics.json``, ``spec`` the job spec as JSON,
    ``teacher_signature`` the inspected teacher and ``student_config`` the student's
    ``config``; a missing key shows as "–" rather than failing. A student left
    unevaluated (``evaluated`` false: its job was cancelled during the export or the
    evaluation) gets why in place of the results, and no figure of the test rows.
    """
    task = str(metrics.get("task", spec.get("task") or "unknown"))
    evaluated = _evaluated(metrics)
    sections = [
        _title(task, teacher_signature, student_config),
        _decision(metrics),
        _ladder(metrics),
        _results(task, metrics) if evaluated else _not_evaluated(metrics),
        _fidelity(metrics) if evaluated else [],
        _quantized(task, metrics, spec) if evaluated else [],
        _baseline_comparison(metrics),
        _what_was_distilled(metrics, teacher_signature, student_config),
        _how(task, metrics, spec),
        _curves(metrics),
        _intended_use(metrics),
        _provenance(metrics),
        _files(spec, student_config, metrics),
    ]
    path = Path(path)
    path.write_text("\n\n".join("\n".join(lines) for lines in sections if lines) + "\n")
    return path
