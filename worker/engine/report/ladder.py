"""``student_ladder.png``: the rungs of a student ladder by size, the chosen one marked.

Left: the validation task metric and fidelity against parameters (log scale), with the
teacher's metric as a dotted line. Right: batch-1 latency against parameters, with the
teacher's latency dotted and any latency bound dashed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _value(rung: Mapping[str, Any], key: str) -> float | None:
    entry = (rung.get("validation") or {}).get(key) or {}
    value = entry.get("value")
    return float(value) if isinstance(value, int | float) else None


def _name(rungs: list[Mapping[str, Any]], key: str) -> str:
    return str(((rungs[0].get("validation") or {}).get(key) or {}).get("name", key))


def plot_student_ladder(path: str | Path, ladder: Mapping[str, Any]) -> Path:
    """Write ``student_ladder.png`` for ``metrics.json``'s ``ladder`` section."""
    import matplotlib

    # Workers have no display; Agg renders straight to files.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = list(ladder.get("rungs") or [])
    chosen = ladder.get("chosen")
    teacher = ladder.get("teacher") or {}
    parameters = [float(rung.get("parameters") or 0) for rung in rungs]
    figure, (quality, speed) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    try:
        for key, marker in (("metric", "o"), ("fidelity", "s")):
            points = [(p, _value(r, key)) for p, r in zip(parameters, rungs, strict=True)]
            kept = [(p, v) for p, v in points if v is not None and p > 0]
            if kept:
                quality.plot(*zip(*kept, strict=True), marker=marker, label=_name(rungs, key))
        teacher_metric = (teacher.get("metric") or {}).get("value")
        if isinstance(teacher_metric, int | float):
            quality.axhline(teacher_metric, color="grey", linestyle=":", label="teacher")
        latencies = [rung.get("latency_ms", rung.get("onnxruntime_latency_ms")) for rung in rungs]
        kept_latency = [
            (p, float(v))
            for p, v in zip(parameters, latencies, strict=True)
            if isinstance(v, int | float) and p > 0
        ]
        if kept_latency:
            speed.plot(*zip(*kept_latency, strict=True), marker="o", label="student")
        teacher_latency = teacher.get("latency_ms")
        if isinstance(teacher_latency, int | float):
            speed.axhline(teacher_latency, color="grey", linestyle=":", label="teacher")
        bound = (ladder.get("criteria") or {}).get("max_latency_ms")
        if isinstance(bound, int | float):
            speed.axhline(bound, color="red", linestyle="--", label="latency bound")
        if isinstance(chosen, int) and 0 <= chosen < len(rungs) and parameters[chosen] > 0:
            for axes in (quality, speed):
                axes.axvline(parameters[chosen], color="black", linestyle="--", label="chosen")
        quality.set_title("validation: task metric and fidelity")
        speed.set_title(f"batch-1 latency ({teacher.get('latency_runtime') or 'onnxruntime'})")
        speed.set_ylabel("ms")
        for axes in (quality, speed):
            axes.set_xlabel("student parameters")
            if any(p > 0 for p in parameters):
                axes.set_xscale("log")
            axes.grid(True, alpha=0.3)
            axes.legend(loc="best", fontsize="small")
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
