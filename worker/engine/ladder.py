"""The student ladder: students sized by evidence rather than by a ratio.

Under ``student.architecture: "auto"`` a tabular teacher gets an MLP, an image
teacher a CNN, and a transformers teacher an encoder of its own family, whose size the
parameter budget sets (``max_parameters``, else the teacher's size over ``compression``).
That is an upper bound, not a need: a tree ensemble of many megabytes is often matched
by an MLP of a few thousand parameters, a CNN by one a fraction of its width, and a
sentence encoder, for a bar its user sets, by a student a fraction of the size ``auto``
gives, each faster at batch 1. The ladder trains a few students of geometric sizes (an
MLP's hidden width, a CNN's first-stage channels, which double each stage; for a
transformers student, geometric compressions from the largest at which a student still
starts from the teacher's layers down to the one ``auto`` designs, each designed as
``auto`` designs it: see :func:`rung_compressions`), from the smallest to the one ``auto``
designs, smallest first, on the one cached teacher pass; judges
each on the VALIDATION rows (task metric against the teacher's, fidelity,
onnxruntime batch-1 latency of its exported file, size) under the acceptance
criteria (and, where the job asks for ``export.quantize: ["int8"]``, its int8 file
too: a rung whose int8 file meets them where its fp32 file does not is chosen as
int8); and stops climbing at the first rung that meets them on the evidence: every
criterion met, and none whose threshold lies inside its figure's 95% interval on the
validation rows. A rung at 0.952 agreement on 126 rows (six misses) has met 0.95 by a
row or so, and fell two points short of the teacher on new rows; the climb goes on to
one whose margin the rows show. When none does,
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
#: The least ratio of a rung's width to the one below it.
MIN_RUNG_RATIO = 1.5
#: What a ladder's rungs differ in, by the architecture ``auto`` chose: the spec field each
#: rung sets (an MLP's, a CNN's), or, for a transformers student, ``encoder``: its
#: [layers, width, feed-forward units] (:func:`rung_size`), which each rung's
#: ``compression`` designs.
RUNG_KNOB = {"mlp": "hidden_sizes", "cnn": "channels", "hf_encoder": "encoder"}
#: How the card heads each knob's column.
KNOB_LABEL = {
    "hidden_sizes": "hidden sizes",
    "channels": "channels",
    "encoder": "layers × width × units",
}
#: The narrowest rung's width, by architecture: a CNN's first stage of 4 channels
#: already doubles to 32 in its fourth.
SMALLEST_WIDTH = {"mlp": MIN_RUNG_WIDTH, "cnn": 4}
#: The transfer sets whose ``auto`` students a ladder sizes.
MODALITIES = ("tabular", "image", "text")
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

    It does under ``architecture: "auto"`` for a tabular transfer set (an MLP), an image
    one (a CNN) or a text one (a transformers teacher's encoder) when no size is asked for:
    ``hidden_sizes``, ``channels``, ``hidden_size``, ``num_layers``, ``num_heads`` and a
    ``compression`` other than the default each ask for one size; ``max_parameters`` is
    an upper bound and only caps the top rung. A text ladder's rungs start from the
    teacher's layers and take every row of its vocabulary, so ``init_from_teacher: false``
    and ``vocabulary: "transfer"`` train one student (and so does a teacher whose
    ``auto`` student does not start from its layers: see the pipeline). The rungs share the
    cached teacher pass, so a teacher run online every step trains one student; and they
    are judged on the validation rows, so too few of those (:data:`MIN_VALIDATION_ROWS`)
    train one student too. The rungs' plans keep the ladder within a few students' time
    (lower floors, early stopping), so explicit ``training.epochs``, which every rung would
    run in full, train one student.
    """
    student = spec.student
    return (
        student.ladder
        and student.architecture == "auto"
        and modality in MODALITIES
        and not student.hidden_sizes
        and not student.channels
        and (modality != "text" or _encoder_ladder(student))
        # Compared with the default rather than read from the fields set: a job's spec is
        # stored whole by the API, so every field of it comes back set.
        and student.compression == StudentSpec.model_fields["compression"].default
        and not online
        and spec.training.epochs == "auto"
        and validation_rows >= MIN_VALIDATION_ROWS
    )


def _encoder_ladder(student: StudentSpec) -> bool:
    """Whether a transformers teacher's ``auto`` student may climb: no width, depth or heads
    asked for, started from the teacher, with its whole vocabulary."""
    return (
        student.hidden_size is None
        and student.num_layers is None
        and student.num_heads is None
        and student.init_from_teacher
        and student.vocabulary == "teacher"
    )


def top_width(config: Mapping[str, Any]) -> int | None:
    """The width of the student ``auto`` designed, if a ladder can vary it: an MLP's equal
    hidden widths, a CNN's first-stage channels (doubling each stage); else None."""
    knob = RUNG_KNOB.get(str(config.get("architecture")))
    sizes = [int(size) for size in config.get(knob) or []] if knob else []
    if not sizes or sizes != rung_sizes(str(config["architecture"]), sizes[0], len(sizes)):
        return None
    return sizes[0]


def rung_size(config: Mapping[str, Any], knob: str) -> list[int]:
    """A rung's size under ``knob``, from its student ``config``: the MLP's hidden sizes, the
    CNN's channels, or an encoder's [layers, width, feed-forward units]."""
    if knob == "encoder":
        shape = config["hf_config"]

        def size(*names: str) -> int:
            # DistilBERT's config keeps its own names (n_layers, dim, hidden_dim).
            return next(int(shape[name]) for name in names if shape.get(name) is not None)

        return [
            size("num_hidden_layers", "n_layers"),
            size("hidden_size", "dim"),
            size("intermediate_size", "hidden_dim"),
        ]
    return [int(size) for size in config[knob]]


def rung_compressions(top: float, largest: float, rungs: int = LADDER_RUNGS) -> list[float]:
    """Compressions of a transformers student's rungs: geometric, from ``largest`` (the most
    at which a student still starts from the teacher's layers; past it, one from random
    weights would not be worth a rung) down to ``top`` (the budget ``auto`` designs for),
    each at least :data:`MIN_RUNG_RATIO` times the next, the smallest student first.

    ``top`` alone where ``largest`` is less than that ratio above it.
    """
    if rungs < 2 or largest < top * MIN_RUNG_RATIO:
        return [top]
    # How many rungs fit at the least ratio (the epsilon keeps exact powers in).
    count = min(rungs, 1 + math.floor(math.log(largest / top) / math.log(MIN_RUNG_RATIO) + 1e-9))
    ratio = (largest / top) ** (1.0 / (count - 1))
    # Those between, rounded down to a hundredth.
    between = [math.floor(top * ratio ** (count - 1 - i) * 100) / 100 for i in range(1, count - 1)]
    return [largest, *between, top]


def rung_sizes(architecture: str, width: int, layers: int) -> list[int]:
    """The ``RUNG_KNOB`` value of a rung of ``width`` with ``layers`` hidden layers or stages."""
    if architecture == "cnn":
        return [width * 2**i for i in range(layers)]
    return [width] * layers


def rung_widths(top: int, rungs: int = LADDER_RUNGS, smallest: int = MIN_RUNG_WIDTH) -> list[int]:
    """Widths from ``smallest`` to ``top``, geometric, ascending, each at least
    :data:`MIN_RUNG_RATIO` times the one before.

    ``top`` (the width ``auto`` designs) is always the last. A narrow ``top`` gets fewer
    rungs (rungs a width or two apart would cost a student each and tell nothing); one
    less than that ratio above ``smallest`` gives that one width alone.
    """
    if top <= smallest or rungs < 2:
        return [top]
    # How many rungs fit at the least ratio (the epsilon keeps exact powers in).
    fit = 1 + math.floor(math.log(top / smallest) / math.log(MIN_RUNG_RATIO) + 1e-9)
    count = min(rungs, fit)
    if count < 2:
        return [top]
    ratio = (top / smallest) ** (1.0 / (count - 1))
    widths = {max(1, round(smallest * ratio**i)) for i in range(count - 1)}
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


def met(rung: Mapping[str, Any]) -> bool:
    """Whether the rung met the criteria on the evidence of the validation rows, as its
    fp32 file or as its int8 file (judged when the job asks for
    ``export.quantize: ["int8"]``)."""
    return bool(rung.get("met_criteria") or (rung.get("int8") or {}).get("met_criteria"))


def precision(rung: Mapping[str, Any]) -> str:
    """The file of the rung that is deployed: ``fp32`` (``student.onnx``) when it met the
    criteria or neither did, else ``int8`` (``student.int8.onnx``)."""
    return "fp32" if rung.get("met_criteria") or not met(rung) else "int8"


def choose(task: str, rungs: Sequence[Mapping[str, Any]]) -> int:
    """The smallest rung that met the criteria (as fp32 or as int8), else the one with the
    best fidelity.

    ``rungs`` are in ascending size; ties in fidelity go to the smaller rung.
    """
    if not rungs:
        raise ValueError("a ladder needs at least one rung")
    for index, rung in enumerate(rungs):
        if met(rung):
            return index
    best = max(ranking_score(task, rung) for rung in rungs)
    return next(i for i, rung in enumerate(rungs) if ranking_score(task, rung) == best)
