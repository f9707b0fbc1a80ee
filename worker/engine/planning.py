"""How long a run trains, decided before it starts: the run plan and pre-flight warnings.

``training.epochs: "auto"`` (the default) sets the number of optimizer steps
from the data and the student's size: at least a floor of steps (more for a
larger student) and at least a few passes over the data, capped by
``training.max_steps`` and by what the time budget is expected to allow.
Early stopping on validation is on by default under ``auto``.

The same estimate gives the pre-flight warnings the API returns with a
submitted job and the engine logs at the start of a run: a spec whose
explicit epochs or max_steps are far below the floor, or whose
``max_minutes`` will likely cut the run short.

This module imports no torch: the API uses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from worker.engine.spec import DistillationSpec, TrainingSpec

#: The fewest optimizer steps an ``auto`` run takes for a small student (under
#: :data:`SMALL_STUDENT`) and for a large one (over :data:`LARGE_STUDENT`); between the two
#: the floor grows with the logarithm of the parameter count.
MIN_STEPS_SMALL = 1500
MIN_STEPS_LARGE = 3000
SMALL_STUDENT = 100_000
LARGE_STUDENT = 10_000_000
#: The fewest passes over the training rows an ``auto`` run makes.
MIN_EPOCHS = 5
#: Early stopping under ``auto``: this share of the planned epochs without a better validation
#: fidelity ends the run (never fewer than :data:`MIN_PATIENCE` epochs), once past the floor
#: of steps: validation agreement on a few hundred rows plateaus long before a small student
#: has learnt what the remaining steps of its schedule teach it.
PATIENCE_SHARE = 0.25
MIN_PATIENCE = 3
#: Explicit steps below this share of the floor draw a ``too_few_steps`` warning.
TOO_FEW_SHARE = 0.5
#: Training rows of text below which a ``small_transfer_set`` warning is given. A text
#: student learns what the teacher says about the sentences it is shown, and its fidelity on
#: other sentences keeps growing with their number: all-MiniLM-L6-v2 at 4x reached a held-out
#: cosine of 0.83 from 1,500 sentences, 0.86 from 6,000 and 0.90 from 21,000
#: (``bench/encoder_student.py``).
SMALL_TEXT_TRANSFER = 10_000
#: An ``auto`` plan fills at most this share of ``max_minutes`` (the rest is the teacher pass,
#: evaluation and export).
BUDGET_SHARE = 0.8

#: A conservative training throughput, as multiply-accumulates per second per step: a slow
#: shared CPU core; a GPU is counted :data:`CUDA_SPEEDUP` times faster. Each step also costs
#: :data:`STEP_OVERHEAD_S` of fixed work (optimizer, batching, Python). One shared core
#: trained a two-layer, 384-wide text encoder at 1.5 to 4 seconds a step of 128 sentences
#: (2e10 to 5e10 by this count, which takes every row as long as the longest); the figure
#: keeps a margin below that. Where it would cut an ``auto`` run short, the engine times a
#: few steps of the real student instead (``seconds_per_step`` of :func:`plan_run`).
CPU_MACS_PER_S = 1.0e10
#: ``training.batch_size: "auto"``: rows per step for rows of text tokens, and for other data.
#: A distilled text encoder reached a higher validation cosine in the same time and on the
#: same sentences at 16 or 32 a step than at 128 (see ``bench/encoder_student.py``).
TEXT_BATCH_SIZE = 32
BATCH_SIZE = 128
#: ``training.learning_rate: "auto"``: for most students, and for a transformers student whose
#: layers start as the teacher's with bridges over the layers it skips
#: (:mod:`worker.engine.hf.bridges`), which starts close to the teacher. all-MiniLM-L6-v2's
#: two-layer student at 4x, 1,500 sentences: held-out cosine 0.774 after 64 steps and 0.807
#: after 256 at 1e-3, 0.796 and 0.816 at 3e-4 (the larger step first undoes the start). Its
#: one-layer student at 10x, which has no bridge, does better at 1e-3 (0.661 against 0.633
#: after 800 steps).
LEARNING_RATE = 1e-3
BRIDGED_LEARNING_RATE = 3e-4
#: The fewest rows a batch of the teacher pass holds (it keeps no gradients).
PASS_BATCH_SIZE = 256
CUDA_SPEEDUP = 20.0
STEP_OVERHEAD_S = 0.004


@dataclass(frozen=True)
class PlanWarning:
    """A pre-flight warning: a stable ``code``, a message, and the spec field it concerns."""

    code: str
    message: str
    field: str

    def to_dict(self) -> dict[str, str]:
        """As JSON: ``{code, message, field}``."""
        return asdict(self)


@dataclass(frozen=True)
class RunPlan:
    """How long a run trains and why; ``to_dict`` goes into ``metrics.json``'s ``training``."""

    epochs: int
    batch_size: int
    steps_per_epoch: int
    #: Optimizer steps planned (the run may still stop early, or on the time budget).
    total_steps: int
    early_stopping_patience: int | None
    #: Early stopping does not end the run before this step (the floor, under ``auto``).
    early_stopping_from_step: int
    #: ``auto`` or ``spec``.
    source: str
    #: Why this many steps, in words.
    reason: str
    min_steps: int
    estimated_seconds: float
    warnings: list[PlanWarning] = field(default_factory=list)
    #: Seconds one step was taken to cost, and whether they were ``estimated`` from the
    #: student's size or ``measured`` on timed steps of the student itself.
    seconds_per_step: float = 0.0
    speed: str = "estimated"
    #: Whether ``max_minutes`` cut an ``auto`` plan below the steps it wanted.
    cut_by_budget: bool = False
    #: The peak learning rate (``training.learning_rate``, ``auto`` resolved).
    learning_rate: float = LEARNING_RATE

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON."""
        data = asdict(self)
        data["estimated_seconds"] = round(self.estimated_seconds, 1)
        data["seconds_per_step"] = round(self.seconds_per_step, 4)
        data["warnings"] = [w.to_dict() for w in self.warnings]
        return data


def batch_size_for(spec: TrainingSpec, *, text: bool) -> int:
    """``spec.batch_size``, with ``"auto"`` resolved for rows of text tokens or other rows."""
    if spec.batch_size == "auto":
        return TEXT_BATCH_SIZE if text else BATCH_SIZE
    return spec.batch_size


def learning_rate_for(spec: TrainingSpec, *, bridged: bool) -> float:
    """``spec.learning_rate``, with ``"auto"`` resolved for a student whose transformer
    layers start as the teacher's with bridges over those it skips (``bridged``), or any
    other."""
    if spec.learning_rate == "auto":
        return BRIDGED_LEARNING_RATE if bridged else LEARNING_RATE
    return spec.learning_rate


def pass_batch_size(spec: TrainingSpec) -> int:
    """Rows per batch when a model only predicts (the teacher pass, the test rows)."""
    return max(batch_size_for(spec, text=False), PASS_BATCH_SIZE)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``rows``.

    A last batch of one row is folded into the one before (a batch of one breaks
    batch norm); any other remainder is a short last batch.
    """
    batch = max(1, min(batch_size, rows))
    if rows % batch == 1:
        return max(1, rows // batch)
    return max(1, math.ceil(rows / batch))


def min_steps_for(student_parameters: int) -> int:
    """The floor of optimizer steps for a student of ``student_parameters``."""
    if student_parameters <= SMALL_STUDENT:
        return MIN_STEPS_SMALL
    if student_parameters >= LARGE_STUDENT:
        return MIN_STEPS_LARGE
    share = math.log(student_parameters / SMALL_STUDENT) / math.log(LARGE_STUDENT / SMALL_STUDENT)
    return round(MIN_STEPS_SMALL + share * (MIN_STEPS_LARGE - MIN_STEPS_SMALL))


def seconds_per_step(
    student_parameters: int, batch_size: int, positions: int = 1, device: str = "cpu"
) -> float:
    """A conservative estimate of one training step's seconds.

    Forward and backward cost about three times the multiply-accumulates of a
    forward pass, which is about one per parameter per input position (a
    sequence's tokens, an image's pixels after the first downsampling).
    """
    macs = 3.0 * student_parameters * batch_size * max(1, positions)
    rate = CPU_MACS_PER_S * (CUDA_SPEEDUP if device.startswith("cuda") else 1.0)
    return STEP_OVERHEAD_S + macs / rate


def plan_run(
    spec: TrainingSpec,
    *,
    rows: int,
    student_parameters: int,
    positions: int = 1,
    device: str = "cpu",
    min_steps: int | None = None,
    compute_parameters: int | None = None,
    step_seconds: float | None = None,
    text: bool = False,
    bridged: bool = False,
) -> RunPlan:
    """The plan for ``rows`` training rows and a student of ``student_parameters``.

    ``min_steps`` replaces the floor of steps for the student's size (a ladder's small
    rungs take a lower one). ``compute_parameters`` (default: all of them) are those a
    step multiplies with; an embedding table's rows are only read. ``step_seconds``, a
    step's cost measured on the student, replaces the estimate from its size. ``text``: the
    rows are text tokens, which ``batch_size: "auto"`` takes fewer of a step. ``bridged``:
    the student's transformer layers start as the teacher's, bridged (see
    :func:`learning_rate_for`).
    """
    batch_size = batch_size_for(spec, text=text)
    per_epoch = steps_per_epoch(rows, batch_size)
    floor = min_steps if min_steps is not None else min_steps_for(student_parameters)
    step_s = step_seconds or seconds_per_step(
        compute_parameters or student_parameters, min(batch_size, rows), positions, device
    )
    budget_steps = max(per_epoch, int(BUDGET_SHARE * spec.max_minutes * 60.0 / step_s))
    if spec.epochs == "auto":
        epochs, reason, cut = _auto_epochs(spec, per_epoch, floor, budget_steps)
        patience: int | None = spec.early_stopping_patience or max(
            MIN_PATIENCE, math.ceil(PATIENCE_SHARE * epochs)
        )
        source = "auto"
    else:
        epochs, patience, source, cut = spec.epochs, spec.early_stopping_patience, "spec", False
        reason = f"training.epochs {epochs} as given"
    total = epochs * per_epoch
    if spec.max_steps is not None and spec.max_steps < total:
        total, reason = spec.max_steps, f"{reason}; capped by training.max_steps {spec.max_steps}"
    # A budget cut that max_steps undercuts anyway does not decide the run's length.
    cut = cut and (spec.max_steps is None or total < spec.max_steps)
    plan = RunPlan(
        epochs=epochs,
        batch_size=max(1, min(batch_size, rows)),
        steps_per_epoch=per_epoch,
        total_steps=total,
        early_stopping_patience=patience,
        early_stopping_from_step=min(floor, total) if source == "auto" else 0,
        source=source,
        reason=reason,
        min_steps=floor,
        estimated_seconds=total * step_s,
        seconds_per_step=step_s,
        speed="measured" if step_seconds else "estimated",
        cut_by_budget=cut,
        learning_rate=learning_rate_for(spec, bridged=bridged),
    )
    return replace(plan, warnings=_warnings(spec, plan, rows=rows, text=text))


def budget_binds(spec: TrainingSpec, plan: RunPlan) -> bool:
    """Whether ``max_minutes`` shortens this plan, or its steps are expected to overrun it.

    Then the speed the plan assumed decides how long the run is, and is worth measuring.
    """
    return plan.cut_by_budget or plan.estimated_seconds > BUDGET_SHARE * spec.max_minutes * 60.0


def _auto_epochs(
    spec: TrainingSpec, per_epoch: int, floor: int, budget_steps: int
) -> tuple[int, str, bool]:
    """Epochs for an ``auto`` run, why, and whether the time budget cut them: the floor or
    the minimum passes, within the budget."""
    by_floor = math.ceil(floor / per_epoch)
    epochs = max(by_floor, MIN_EPOCHS)
    reason = (
        f"at least {floor} optimizer steps for a student of this size"
        if by_floor >= MIN_EPOCHS
        else f"at least {MIN_EPOCHS} passes over the training rows"
    )
    fits = max(1, budget_steps // per_epoch)
    cut = fits < epochs
    if cut:
        epochs = fits
        reason += f"; cut to {fits} epochs to fit training.max_minutes {spec.max_minutes:g}"
    return min(epochs, 10000), reason, cut


def _warnings(spec: TrainingSpec, plan: RunPlan, *, rows: int, text: bool) -> list[PlanWarning]:
    """What in the spec or the data will likely leave the student undertrained."""
    found: list[PlanWarning] = []
    if text and rows < SMALL_TEXT_TRANSFER:
        found.append(
            PlanWarning(
                code="small_transfer_set",
                message=f"{rows} training sentences are few for a text student: its fidelity "
                "on other sentences grows with the transfer set (a sentence encoder at 4x: "
                "cosine about 0.83 from 1,500 sentences, 0.90 from 21,000); unlabelled text from "
                f"the same domain, {SMALL_TEXT_TRANSFER} sentences or more, helps",
                field="dataset_id",
            )
        )
    explicit = plan.source == "spec" or spec.max_steps is not None
    if explicit and plan.total_steps < TOO_FEW_SHARE * plan.min_steps:
        by_max_steps = spec.max_steps is not None and spec.max_steps == plan.total_steps
        found.append(
            PlanWarning(
                code="too_few_steps",
                message=f"{plan.total_steps} optimizer steps are far below the "
                f"{plan.min_steps} a student of this size usually needs; the student will "
                'likely underfit (leave training.epochs at "auto")',
                field="training.max_steps" if by_max_steps else "training.epochs",
            )
        )
    cut_by_budget = plan.source == "auto" and plan.total_steps < min(
        plan.min_steps, spec.max_steps or plan.min_steps
    )
    if cut_by_budget:
        found.append(
            PlanWarning(
                code="time_budget_short",
                message=f"training.max_minutes {spec.max_minutes:g} allows an estimated "
                f"{plan.total_steps} optimizer steps, fewer than the {plan.min_steps} a student "
                "of this size usually needs; raise it or expect an undertrained student",
                field="training.max_minutes",
            )
        )
    elif plan.estimated_seconds > spec.max_minutes * 60.0:
        found.append(
            PlanWarning(
                code="time_budget_short",
                message=f"{plan.total_steps} steps are estimated to take "
                f"{plan.estimated_seconds / 60.0:.0f} minutes, more than training.max_minutes "
                f"{spec.max_minutes:g}: the run will likely stop early with a partial student",
                field="training.max_minutes",
            )
        )
    return found


def input_positions(modality: str, feature_shape: list[int] | tuple[int, ...]) -> int:
    """Positions one row's features run through: tokens of text, a quarter of an image's pixels."""
    if modality == "text" and feature_shape:
        return max(1, int(feature_shape[0]))
    if modality == "image" and len(feature_shape) >= 2:
        return max(1, int(feature_shape[-1]) * int(feature_shape[-2]) // 4)
    return 1


def estimate_student_parameters(
    *,
    max_parameters: int | None,
    compression: float | None,
    teacher_parameters: int | None,
    teacher_bytes: int | None,
) -> int:
    """Before the student is built: the size the spec asks for, from the teacher's size."""
    if max_parameters is not None:
        return max_parameters
    ratio = compression or 1.0
    if teacher_parameters:
        return max(1, int(teacher_parameters / ratio))
    if teacher_bytes:
        return max(1, int(teacher_bytes / 4 / ratio))
    return SMALL_STUDENT


def preflight_warnings(
    spec: DistillationSpec,
    *,
    rows: int,
    modality: str,
    feature_shape: list[int] | tuple[int, ...] | None,
    teacher_parameters: int | None,
    teacher_bytes: int | None,
) -> list[PlanWarning]:
    """The warnings of a job's plan, known before the student is built (the API's 202).

    The student's size is estimated from the spec and the teacher; the speed is
    the conservative CPU figure, so a GPU worker may finish well within a budget
    warned about here. The engine repeats the check on the student it builds.
    """
    held_out = spec.evaluation.validation_split
    if spec.evaluation.test_dataset_id is None:
        held_out += spec.evaluation.test_split
    train_rows = max(1, int(rows * (1.0 - held_out)))
    shape = feature_shape or ([spec.data.max_length] if modality == "text" else [])
    plan = plan_run(
        spec.training,
        rows=train_rows,
        student_parameters=estimate_student_parameters(
            max_parameters=spec.student.max_parameters,
            compression=spec.student.compression,
            teacher_parameters=teacher_parameters,
            teacher_bytes=teacher_bytes,
        ),
        positions=input_positions(modality, shape),
        text=modality == "text",
    )
    return plan.warnings
