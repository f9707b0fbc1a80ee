"""The student ladder: tabular students sized by evidence rather than by a ratio.

Under ``student.architecture: "auto"`` a tabular teacher gets an MLP whose width
the parameter budget sets (``max_parameters``, else the teacher's size over
``compression``). That is an upper bound, not a need: a tree ensemble of many
megabytes is often matched by an MLP of a few thousand parameters, which is faster
at batch 1. The ladder trains a few MLPs of geometric widths, from tiny to the
width ``auto`` designs, smallest first, on the one cached teacher pass; judges
each on the VALIDATION rows (task metric against the teacher's, fidelity,
onnxruntime batch-1 latency of its exported file, size) under the acceptance
criteria; and stops climbing at the first rung that meets them. When none does,
the rung with the best validation fidelity is kept and the ladder says so. The
test rows choose nothing: the chosen rung is then exported and judged on them
like any student.

This module holds the decisions (when a ladder runs, its widths, the per-rung plan,
which rung is chosen); :mod:`worker.engine.pipeline` trains and measures the rungs.
It imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from worker.engine.planning import MIN_STEPS_SMALL, min_steps_for
from worker.engine.spec import DistillationSpec, StudentSpec

#: Rungs in a full ladder (fewer when the top width is small).
LADDER_RUNGS = 5
#: The narrowest rung's hidden width.
MIN_RUNG_WIDTH = 8
#: The floor of optimizer steps of a rung below the top: a third of the usual floor. A
#: small rung either meets the criteria within it or is passed over for the next one; the
#: top rung, the student ``auto`` designs alone, keeps the usual floor.
MIN_RUNG_STEPS = MIN_STEPS_SMALL // 3
#: The fewest validation rows a ladder is judged on. On fewer, one row is a few points of
#: agreement: a tiny rung can meet the criteria by luck (40 rows, one miss allowed) and
#: fall several points short on new rows, so the job trains the one ``auto`` student.
MIN_VALIDATION_ROWS = 100
#: The fidelity figure each task ranks rungs by when none meets the criteria.
RANKING_FIDELITY = {
    "classification": "agreement",
    "regression": "r2_to_teacher",
    "embedding": "cosine",
}


def applies(
    spec: DistillationSpec, modality: str, online: bool, validation_rows: int = MIN_VALIDATION_ROWS
) -> bool:
    """Whether this job trains a ladder instead of one student.

    It does under ``architecture: "auto"`` for a tabular transfer set (an MLP) when no
    size is asked for: ``hidden_sizes`` and a ``compression`` other than the default each
    ask for one size; ``max_parameters`` is an upper bound and only caps the top rung. The
    rungs share the cached teacher pass, so a teacher run online every step trains one
    student; and they are judged on the validation rows, so too few of those
    (:data:`MIN_VALIDATION_ROWS`) train one student too. The rungs' plans keep the ladder
    within a few students' time (lower floors, early stopping), so explicit
    ``training.epochs``, which every rung would run in full, train one student.
    """
    student = spec.student
    return (
        student.ladder
        and student.architecture == "auto"
        and modality == "tabular"
        and not student.hidden_sizes
        # Compared with the default rather than read from the fields set: a job's spec is
        # stored whole by the API, so every field of it comes back set.
        and student.compression == StudentSpec.model_fields["compression"].default
        and not online
        and spec.training.epochs == "auto"
        and validation_rows >= MIN_VALIDATION_ROWS
    )


def rung_widths(top: int, rungs: int = LADDER_RUNGS, smallest: int = MIN_RUNG_WIDTH) -> list[int]:
    """Hidden widths from ``smallest`` to ``top``, geometric, distinct, ascending.

    ``top`` (the width ``auto`` designs) is always the last; a ``top`` at or below
    ``smallest`` gives that one width alone.
    """
    if top <= smallest or rungs < 2:
        return [top]
    ratio = (top / smallest) ** (1.0 / (rungs - 1))
    widths = {max(1, round(smallest * ratio**i)) for i in range(rungs - 1)}
    return sorted(w for w in widths | {top} if w <= top)


def rung_min_steps(student_parameters: int, top: bool) -> int:
    """The floor of optimizer steps of one rung: the usual one for the top rung."""
    usual = min_steps_for(student_parameters)
    return usual if top else min(usual, MIN_RUNG_STEPS)


def rung_minutes(remaining_minutes: float, rungs_left: int) -> float:
    """A rung's time budget: an equal share of what is left; what it leaves goes on up."""
    return max(remaining_minutes, 0.0) / max(rungs_left, 1)


def ranking_score(task: str, rung: Mapping[str, Any]) -> float:
    """The rung's validation fidelity (higher is better; a missing figure ranks last)."""
    value = (rung.get("validation") or {}).get("fidelity", {}).get("value")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else -math.inf


def choose(task: str, rungs: Sequence[Mapping[str, Any]]) -> int:
    """The smallest rung that met the criteria, else the one with the best fidelity.

    ``rungs`` are in ascending size; ties in fidelity go to the smaller rung.
    """
    if not rungs:
        raise ValueError("a ladder needs at least one rung")
    for index, rung in enumerate(rungs):
        if rung.get("met_criteria"):
            return index
    best = max(ranking_score(task, rung) for rung in rungs)
    return next(i for i, rung in enumerate(rungs) if ranking_score(task, rung) == best)
