"""The loop: epochs of steps over one training set, with validation, checkpoints and stops.

:class:`Trainer` keeps a run's state explicit (the step counters in
:class:`LoopState`, the best weights, the progress window, why it stopped) and
gives each concern one method: the step, progress reporting, validation at the
end of an epoch, checkpointing, and the cancellation and time-budget checks
that come before every step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.engine.errors import Cancelled, OutOfMemory
from worker.engine.planning import RunPlan, budget_binds, plan_run
from worker.engine.spec import TrainingSpec
from worker.engine.training.batches import TrainingData, draw_batch, length_bucketed
from worker.engine.training.callbacks import Callbacks
from worker.engine.training.checkpoints import (
    LoopState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    snapshot_weights,
)
from worker.engine.training.devices import autocast_dtype
from worker.engine.training.progress import ProgressWindow
from worker.engine.training.schedules import StepPlan, lr_factor, make_optimizer
from worker.engine.training.step import take_step, time_steps
from worker.engine.training.validation import SCORE_BASIS, predict, validation_score


@dataclass
class TrainResult:
    """What a run returns: the best student (in eval mode) and how the run went."""

    student: nn.Module
    history: list[dict[str, Any]]
    steps: int
    best_step: int | None
    best_score: float | None
    stop_reason: str  # completed | early_stopping | time_budget | max_steps | cancelled
    resumed_from: int | None
    seconds: float
    samples_per_s: float
    #: How long the run was planned to be and why (``metrics.json``'s ``training.plan``).
    plan: RunPlan | None = None


def train(
    *,
    student: nn.Module,
    loss_fn: nn.Module,
    data: TrainingData,
    spec: TrainingSpec,
    task: str,
    teacher_output_kind: str,
    device: torch.device,
    callbacks: Callbacks | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    log_every_steps: int | None = None,
    use_teacher: bool = True,
    plan: RunPlan | None = None,
) -> TrainResult:
    """Train ``student`` against the teacher targets in ``data``; returns the best student.

    The best student (by validation fidelity, or validation loss on labels when
    ``use_teacher`` is off) is restored at the end. Non-finite losses are
    checked at every log point and before every checkpoint, so a NaN never
    reaches a checkpoint, and the error names the first bad step. Validation
    reads a classifier's targets (``val_teacher``) as ``teacher_output_kind`` says:
    ``logits`` or ``probabilities``.
    ``plan`` sets the steps and early stopping; left out, it is planned here
    from ``spec``, the training rows and the student's size.
    """
    trainer = Trainer(
        student=student,
        loss_fn=loss_fn,
        data=data,
        spec=spec,
        task=task,
        teacher_output_kind=teacher_output_kind,
        device=device,
        callbacks=callbacks or Callbacks(),
        checkpoint_dir=checkpoint_dir,
        log_every_steps=log_every_steps,
        use_teacher=use_teacher,
        plan=plan,
    )
    return trainer.run(resume=resume)


def plan_for_data(
    spec: TrainingSpec,
    data: TrainingData,
    student: nn.Module,
    device: torch.device,
    min_steps: int | None = None,
    loss_fn: nn.Module | None = None,
    use_teacher: bool = True,
) -> RunPlan:
    """The run plan for ``student`` on ``data``: its rows, its size and its input positions.

    ``min_steps`` replaces the floor of steps for the student's size. Where the time
    budget decides the length of the run (see :func:`~worker.engine.planning.budget_binds`)
    and ``loss_fn`` is given, a few steps of the student are timed
    (:func:`~worker.engine.training.step.time_steps`) and the plan is made again with
    their cost instead of the estimate from the student's size, which can be off by an
    order of magnitude either way.
    """
    first = next(iter(data.train.values()))
    mask = data.train.get("attention_mask")
    text = first.ndim == 2 and not first.is_floating_point()
    if text:
        positions = int(first.shape[1])  # token ids
        if mask is not None and len(mask):
            # Transformer students skip the padding columns no row of a batch attends to.
            positions = max(1, min(positions, int(mask.ne(0).sum(1).max())))
    elif first.ndim >= 4:
        positions = int(first.shape[-1]) * int(first.shape[-2]) // 4  # images
    else:
        positions = 1
    # An embedding table is read, not multiplied: its rows cost no multiply-accumulates.
    lookups = sum(
        parameter.numel()
        for module in student.modules()
        if isinstance(module, nn.Embedding)
        for parameter in module.parameters(recurse=False)
    )
    parameters = sum(p.numel() for p in student.parameters())

    def plan(step_seconds: float | None = None) -> RunPlan:
        return plan_run(
            spec,
            rows=data.size,
            student_parameters=parameters,
            positions=positions,
            device=device.type,
            min_steps=min_steps,
            compute_parameters=max(1, parameters - lookups),
            step_seconds=step_seconds,
            text=text,
            bridged=bool(getattr(student, "config", {}).get("bridges")),
        )

    estimated = plan()
    if loss_fn is None or not budget_binds(spec, estimated):
        return estimated
    measured = time_steps(
        student,
        loss_fn,
        data,
        device,
        batch_size=estimated.batch_size,
        amp_dtype=autocast_dtype(spec.precision, device),
        clip_norm=spec.grad_clip_norm,
        seed=spec.seed,
        use_teacher=use_teacher,
    )
    return plan(measured)


class Trainer:
    """One training run over ``data``; :meth:`run` trains and returns the best student.

    Constructing it seeds torch, moves the student and the loss to the device and
    builds the optimizer, in that order, so a seeded run starts the same way every time.
    """

    def __init__(
        self,
        *,
        student: nn.Module,
        loss_fn: nn.Module,
        data: TrainingData,
        spec: TrainingSpec,
        task: str,
        device: torch.device,
        callbacks: Callbacks,
        checkpoint_dir: Path | None,
        teacher_output_kind: str = "logits",
        log_every_steps: int | None,
        use_teacher: bool,
        plan: RunPlan | None = None,
    ) -> None:
        self.started = time.monotonic()
        self.student = student
        self.loss_fn = loss_fn
        self.data = data
        self.spec = spec
        self.task = task
        self.teacher_output_kind = teacher_output_kind
        self.device = device
        self.callbacks = callbacks
        self.checkpoint_dir = checkpoint_dir
        self.use_teacher = use_teacher
        self.run_plan = plan or plan_for_data(
            spec, data, student, device, loss_fn=loss_fn, use_teacher=use_teacher
        )
        self.plan = StepPlan.for_run(self.run_plan, log_every_steps)
        # Text batches are drawn by length, so a batch pays for its own rows' padding only.
        self.lengths = data.lengths()
        self.amp_dtype = autocast_dtype(spec.precision, device)

        torch.manual_seed(spec.seed)
        student.to(device).train()
        loss_fn.to(device).train()
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.params += [p for p in loss_fn.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, spec, self.run_plan.learning_rate)

        self.state = LoopState()
        self.best: dict[str, torch.Tensor] | None = None
        self.resumed_from: int | None = None
        self.elapsed_before = 0.0  # seconds spent by the runs this one resumes
        self.stop_reason = "max_steps" if self.plan.capped else "completed"
        self.progress = ProgressWindow()
        self.last_checkpoint_time = time.monotonic()

    def run(self, *, resume: bool = True) -> TrainResult:
        """Resume from the latest checkpoint (when ``resume``), train, restore the best student."""
        if resume:
            self._resume()
        try:
            self._train_epochs()
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(
                f"the device ran out of memory at step {self.state.step}; lower "
                "training.batch_size",
                field="training.batch_size",
            ) from exc
        if self.progress.pending:
            self._report_progress(self.state.step // self.plan.steps_per_epoch)
        return self._result()

    # ------------------------------------------------------------------ epochs and steps

    def _train_epochs(self) -> None:
        """Epochs until the plan is done; each ends with validation, which may stop early."""
        while self.state.step < self.plan.total_steps:
            epoch = self.state.step // self.plan.steps_per_epoch
            self._train_epoch(epoch)
            if self.stop_reason in ("time_budget", "cancelled"):
                return
            if self.progress.pending:
                self._report_progress(epoch)
            self._validate(epoch)
            if self._patience_ran_out():
                self.stop_reason = "early_stopping"
                return

    def _train_epoch(self, epoch: int) -> None:
        """The epoch's remaining steps; a resumed run starts where its checkpoint was taken."""
        # Seeded by epoch, so a resumed run draws the same batches as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        order = torch.randperm(self.data.size, generator=generator)
        if self.lengths is not None:
            order = length_bucketed(order, self.lengths, self.plan.batch_size, generator)
        first = self.state.step % self.plan.steps_per_epoch
        for position in range(first, self.plan.steps_per_epoch):
            if self.state.step >= self.plan.total_steps:
                return
            if self._stop_if_cancelled():
                return
            if self._out_of_time():
                self.stop_reason = "time_budget"
                # The run can be taken up again from here with a larger budget.
                self._checkpoint()
                return
            self._step(self.plan.batch_rows(order, position))
            if self.state.step % self.plan.log_every == 0:
                self._report_progress(epoch)
            if self._checkpoint_due() and self.state.step < self.plan.total_steps:
                self._checkpoint()

    def _step(self, rows: torch.Tensor) -> None:
        factor = lr_factor(
            self.state.step, self.plan.total_steps, self.spec.warmup_steps, self.spec.scheduler
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.run_plan.learning_rate * factor
        terms = take_step(
            self.student,
            self.loss_fn,
            self.optimizer,
            draw_batch(self.data, rows, self.device, self.use_teacher),
            device=self.device,
            amp_dtype=self.amp_dtype,
            params=self.params,
            clip_norm=self.spec.grad_clip_norm,
        )
        self.state.step += 1
        self.progress.add(terms, len(rows))

    # ------------------------------------------------------------------ stops

    def _stop_if_cancelled(self) -> bool:
        """On a cancellation, checkpoint, then raise :class:`Cancelled` (to be resumed) or,
        when the caller keeps the student and one was validated, end training here (True)."""
        if not self.callbacks.cancelled():
            return False
        self._checkpoint()
        if self.best is not None and self.callbacks.keeps_student_on_cancel():
            self.stop_reason = "cancelled"
            return True
        raise Cancelled(f"stopped at step {self.state.step}, after a checkpoint")

    def _elapsed_s(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def _out_of_time(self) -> bool:
        return self._elapsed_s() > self.spec.max_minutes * 60.0

    def _patience_ran_out(self) -> bool:
        patience = self.run_plan.early_stopping_patience
        if patience is None or self.state.step < self.run_plan.early_stopping_from_step:
            return False
        return self.state.epochs_without_improvement >= patience

    # ------------------------------------------------------------------ progress and validation

    def _report_progress(self, epoch: int) -> None:
        self.progress.check_finite(self.state.step)
        row = self.progress.close(
            step=self.state.step,
            total_steps=self.plan.total_steps,
            epoch=epoch,
            lr=self.optimizer.param_groups[0]["lr"],
            batch_size=self.plan.batch_size,
        )
        self.state.history.append(
            {key: value for key, value in row.items() if key not in ("total_steps", "eta_s")}
        )
        self.callbacks.progress(row)

    def _validate(self, epoch: int) -> None:
        """Score the student on the validation split and keep it if it is the best so far."""
        result = self._validation_figures()
        score = result.pop("score")
        state = self.state
        best = state.best_score
        improved = best is None or score > best + 1e-9
        # A tie keeps the later, longer-trained student (a coarse score, as agreement was,
        # can reach its top within a few epochs). Only a strict improvement resets patience.
        if improved or (best is not None and score >= best - 1e-9):
            state.best_score = score if improved else best
            state.best_score_basis = SCORE_BASIS[self.task]
            state.best_step = state.step
            self.best = snapshot_weights(self.student)
        if improved:
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        if state.history:
            state.history[-1].update(result)
        self.callbacks.event("evaluation", {"step": state.step, "epoch": epoch, **result})

    def _validation_figures(self) -> dict[str, float]:
        """The student's validation figures as it stands, ``score`` among them."""
        batch_size = max(self.plan.batch_size, 256)
        outputs = predict(self.student, self.data.val, batch_size, self.amp_dtype)
        return validation_score(
            outputs,
            self.data.val_teacher.to(outputs.device),
            self.task,
            self.teacher_output_kind,
        )

    def _score_of(self, weights: dict[str, torch.Tensor] | None) -> float | None:
        """The validation score of ``weights`` (None for none); the student is left as it was."""
        if weights is None:
            return None
        current = snapshot_weights(self.student)
        self.student.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        try:
            return self._validation_figures()["score"]
        finally:
            self.student.load_state_dict({k: v.to(self.device) for k, v in current.items()})

    # ------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.checkpoint_dir)
        if checkpoint is not None:
            self.state, self.best = load_checkpoint(
                checkpoint, student=self.student, loss=self.loss_fn, optimizer=self.optimizer
            )
            self.resumed_from = self.state.step
            resumed: dict[str, Any] = {"step": self.state.step, "checkpoint": checkpoint.name}
            basis = SCORE_BASIS[self.task]
            if self.state.best_score is not None and self.state.best_score_basis != basis:
                # Written when the best step was chosen on another score: the kept weights
                # are scored again on this one, or no later step could be compared with them.
                self.state.best_score = self._score_of(self.best)
                self.state.best_score_basis = basis
                resumed["rescored_best"] = basis
            self.callbacks.event("resumed", resumed)
        self.elapsed_before = self.state.elapsed_s

    def _checkpoint_due(self) -> bool:
        every_steps = self.spec.checkpoint_every_steps
        every_minutes = self.spec.checkpoint_every_minutes
        due_by_steps = every_steps is not None and self.state.step % every_steps == 0
        due_by_time = (
            every_minutes is not None
            and time.monotonic() - self.last_checkpoint_time > every_minutes * 60
        )
        return due_by_steps or due_by_time

    def _checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        self.progress.check_finite(self.state.step)
        self.state.elapsed_s = self._elapsed_s()
        path = save_checkpoint(
            self.checkpoint_dir,
            student=self.student,
            loss=self.loss_fn,
            optimizer=self.optimizer,
            state=self.state,
            best=self.best,
        )
        self.last_checkpoint_time = time.monotonic()
        self.callbacks.event("checkpoint", {"step": self.state.step, "path": path.name})

    # ------------------------------------------------------------------ the result

    def _result(self) -> TrainResult:
        # Stopped by the time budget before any validation, ``best`` is None and
        # the student stays as it is.
        if self.best is not None:
            self.student.load_state_dict({k: v.to(self.device) for k, v in self.best.items()})
        self.student.eval()
        seconds = time.monotonic() - self.started
        trained_steps = self.state.step - (self.resumed_from or 0)
        return TrainResult(
            student=self.student,
            history=self.state.history,
            steps=self.state.step,
            best_step=self.state.best_step,
            best_score=self.state.best_score,
            stop_reason=self.stop_reason,
            resumed_from=self.resumed_from,
            seconds=seconds,
            samples_per_s=trained_steps * self.plan.batch_size / seconds if seconds > 0 else 0.0,
            plan=self.run_plan,
        )
