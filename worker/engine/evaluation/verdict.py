"""Should this student be deployed? Acceptance criteria checked against the test figures.

:func:`decide` checks each criterion against ``metrics.json``'s figures and gives
``{"deployable", "reasons", "criteria"}``: one reason per criterion, met or missed,
with the figures. A criterion whose figure could not be measured (e.g. no latency)
is reported as not checked and does not block, as is the task-metric ratio where the
teacher's outputs, not labels, are the reference (it would judge fidelity twice). A
cancelled job's student is never deployable: where it was evaluated, its criteria are
still checked and reported after the reason (:func:`withhold`); where it was not, none
is (:func:`not_evaluated`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The task metric each task's verdict compares with the teacher's.
ACCEPT_METRIC = {"classification": "accuracy", "regression": "r2", "embedding": "cosine"}
#: The fidelity figure, and the acceptance key bounding it, by task.
ACCEPT_FIDELITY = {
    "classification": ("agreement", "min_agreement"),
    "embedding": ("cosine", "min_cosine"),
}


def _criterion(
    name: str,
    value: float | None,
    threshold: float,
    at_least: bool,
    what: str,
    unchecked: str | None = None,
) -> tuple[dict[str, Any], str]:
    """One checked criterion and its reason; ``unchecked`` says why it is not checked."""
    bound = f"{'at least' if at_least else 'at most'} {threshold:.4g}"
    if unchecked is not None:
        shown = "" if value is None else f"; {what} is {value:.4g}"
        return (
            {"value": value, "threshold": threshold, "met": None},
            f"not checked: {unchecked}{shown} [{name}]",
        )
    if value is None:
        return (
            {"value": None, "threshold": threshold, "met": None},
            f"not checked: {what} could not be measured (required {bound})",
        )
    met = value >= threshold if at_least else value <= threshold
    word = "met" if met else "missed"
    return (
        {"value": value, "threshold": threshold, "met": met},
        f"{word}: {what} is {value:.4g} ({bound} required) [{name}]",
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


#: A criterion to check: (name, value, threshold, at_least, what, why not checked or None).
Check = tuple[str, float | None, float | None, bool, str, str | None]


def _quality(task: str, metrics: Mapping[str, Any], accept: Mapping[str, Any]) -> list[Check]:
    """The task-metric and fidelity criteria; the metric ratio is not checked where the
    teacher is the reference (:func:`_has_labels`)."""
    teacher, student = metrics.get("teacher") or {}, metrics.get("student") or {}
    metric = ACCEPT_METRIC[task]
    ours, theirs = _number(student.get(metric)), _number(teacher.get(metric))
    checks: list[Check] = []
    if task == "regression":
        drop = None if ours is None or theirs is None else theirs - ours
        checks.append(
            (
                "max_r2_drop",
                drop,
                accept["max_r2_drop"],
                False,
                f"the student's R² drop from the teacher's ({theirs} -> {ours})",
                None,
            )
        )
    else:
        ratio = ours / theirs if ours is not None and theirs is not None and theirs > 0 else None
        key, name = ACCEPT_FIDELITY[task]
        checks.append(
            (
                "min_metric_ratio",
                ratio,
                accept["min_metric_ratio"],
                True,
                f"the student's {metric} as a ratio of the teacher's ({ours} / {theirs})",
                None if _has_labels(metrics) else _same_as_fidelity(metric, key, name),
            )
        )
        checks.append(
            (
                name,
                _number((metrics.get("fidelity") or {}).get(key)),
                accept[name],
                True,
                f"the student's {key} with the teacher",
                None,
            )
        )
    return checks


def _has_labels(metrics: Mapping[str, Any]) -> bool:
    """Whether the task metrics were scored against labels, not the teacher's own outputs.

    Without labels (and always for embeddings) the teacher is the reference: its own
    metric is perfect by construction and the student's is its fidelity to the teacher
    under another name. A ratio of the two would judge fidelity a second time, at
    ``min_metric_ratio``'s threshold instead of the fidelity criterion's own.
    """
    return (metrics.get("split") or {}).get("reference") != "teacher"


def _same_as_fidelity(metric: str, fidelity: str, criterion: str) -> str:
    """Why the metric ratio is not checked where the teacher is the reference."""
    return (
        f"without labels the student's {metric} is measured against the teacher's outputs, "
        f"so it is its {fidelity} with the teacher, which {criterion} judges"
    )


def decide(task: str, metrics: Mapping[str, Any], accept: Mapping[str, Any]) -> dict[str, Any]:
    """``{"deployable", "reasons", "criteria"}`` for ``metrics`` under ``accept``.

    ``accept`` holds ``min_metric_ratio``, ``max_r2_drop``, ``min_agreement``,
    ``min_cosine``, ``max_latency_ms``, ``min_speedup`` and ``min_compression``; a
    None threshold is not checked. ``deployable`` is True when no criterion is missed
    and the run was not cancelled (``training.stop_reason`` ``cancelled``).
    """
    checks = _quality(task, metrics, accept)
    student = metrics.get("student") or {}
    speed = [
        (
            "max_latency_ms",
            _number(student.get("latency_ms")),
            False,
            "the student's batch-1 latency in ms",
        ),
        (
            "min_speedup",
            _number(metrics.get("speedup")),
            True,
            "the speedup over the teacher at batch 1",
        ),
        (
            "min_compression",
            _number(metrics.get("compression")),
            True,
            f"the compression by {metrics.get('compression_basis') or 'parameters'}",
        ),
    ]
    checks += [
        (name, value, accept[name], at_least, what, None) for name, value, at_least, what in speed
    ]
    criteria: dict[str, Any] = {}
    reasons: list[str] = []
    for name, value, threshold, at_least, what, unchecked in checks:
        if threshold is None:
            continue
        criteria[name], reason = _criterion(
            name, value, float(threshold), at_least, what, unchecked
        )
        reasons.append(reason)
    deployable = all(c["met"] is not False for c in criteria.values())
    # Missed criteria first: they are what a reader must see.
    reasons.sort(key=lambda r: not r.startswith("missed"))
    verdict = {
        "deployable": deployable,
        "reasons": reasons,
        "criteria": criteria,
        "caveats": _caveats(task, metrics, criteria),
    }
    if (metrics.get("training") or {}).get("stop_reason") == "cancelled":
        return withhold(
            verdict,
            "the job was cancelled: its student is the best one found before then, not a "
            "finished one",
        )
    return verdict


def withhold(verdict: Mapping[str, Any], why: str) -> dict[str, Any]:
    """``verdict`` made not deployable because ``why``, which comes first among its reasons."""
    reasons = [str(reason) for reason in verdict.get("reasons", [])]
    return {
        "deployable": False,
        "reasons": [f"not deployable: {why}", *reasons],
        "criteria": dict(verdict.get("criteria") or {}),
        "caveats": [str(caveat) for caveat in verdict.get("caveats") or []],
    }


def not_evaluated(task: str, accept: Mapping[str, Any], why: str) -> dict[str, Any]:
    """The verdict on a student that was not evaluated because ``why``: not deployable, with
    every criterion of ``accept`` for ``task`` listed and none checked."""
    criteria = decide(task, {}, accept)["criteria"]
    return {
        "deployable": False,
        "reasons": [f"not deployable: {why}; no criterion was checked"],
        "criteria": criteria,
        "caveats": [],
    }


def _caveats(task: str, metrics: Mapping[str, Any], criteria: Mapping[str, Any]) -> list[str]:
    """What the test rows cannot settle: each checked quality criterion whose threshold lies
    inside the 95% interval of its figure (``metrics["intervals"]``), with the row count.

    Met or missed, such a criterion could have gone the other way on another draw of as
    many rows; the reader is told so, and how to settle it (more test rows), rather than
    handed a verdict that reads as certain. The task-metric ratio's threshold is turned
    into the student metric it asks for (threshold times the teacher's), the R² drop's
    into the student R² it allows; the teacher's own sampling spread is not counted.
    """
    intervals = metrics.get("intervals") or {}
    teacher = metrics.get("teacher") or {}
    split = metrics.get("split") or {}
    rows = split.get("scored_rows", split.get("test_rows"))
    # A ladder's rungs are judged on the validation rows, the job's student on the test rows.
    scored_on = split.get("scored_on", "test")
    settle = (
        "more test rows (a larger transfer set, or evaluation.test_dataset_id) would settle it"
        if scored_on == "test"
        else "more validation rows (a larger transfer set) would settle it"
    )
    metric = ACCEPT_METRIC[task]
    theirs = _number(teacher.get(metric))
    fidelity = ACCEPT_FIDELITY.get(task)
    bounds: list[tuple[str, Any, float, str]] = []
    for name, found in criteria.items():
        threshold = _number(found.get("threshold"))
        if found.get("met") is None or threshold is None:
            continue
        if name in ("min_metric_ratio", "max_r2_drop") and theirs is not None:
            required = threshold * theirs if name == "min_metric_ratio" else theirs - threshold
            bounds.append((name, intervals.get("student"), required, metric))
        elif fidelity is not None and name == fidelity[1]:
            bounds.append((name, intervals.get("fidelity"), threshold, fidelity[0]))
    caveats = []
    for name, interval, required, what in bounds:
        if not isinstance(interval, Mapping):
            continue
        low, high = _number(interval.get("low")), _number(interval.get("high"))
        if low is None or high is None or not low <= required <= high:
            continue
        counted = (
            f"the {rows} {scored_on} rows" if isinstance(rows, int) else f"the {scored_on} rows"
        )
        caveats.append(
            f"{counted} cannot settle {name}: the student's {what} has a 95% interval of "
            f"{low:.4g} to {high:.4g}, which holds the {required:.4g} it requires; {settle}"
        )
    return caveats
