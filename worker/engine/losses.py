"""Distillation losses, registered by name, and the combined loss a job trains with.

A loss returns its terms by name (``{"soft": ..., "hard": ...}``), each already
weighted; the training loss is their sum. Every term is computed in fp32 with
autocast switched off, whatever dtype the student produced.

Conventions for labels: class ids are int64 with ``-1`` for unlabeled rows;
regression targets are float with ``NaN`` for unlabeled rows. Label terms
average over the labeled rows of the batch and are left out when it has none.

The ``hint`` loss owns a learned projection (parameters), so the optimizer must
include ``loss.parameters()`` and the loss must be moved to the training device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.errors import DatasetInvalid, SpecInvalid, TeacherIncompatible
from worker.engine.registry import Registry
from worker.engine.spec import DEFAULT_METHOD, DistillationSpec, MethodSpec

# Floor for teacher probabilities before the log: a zero probability would give -inf.
PROBABILITY_FLOOR = 1e-8
CLASS_OUTPUT_KINDS = ("logits", "probabilities")


@dataclass
class LossContext:
    """What a loss factory knows about the task, the teacher and the student."""

    task: str
    teacher_output_kind: str
    has_labels: bool
    student_feature_dim: int
    teacher_feature_dim: int | None
    #: Spec field errors should name (``method.name`` or ``method.extra_terms``).
    field: str = "method.name"


#: ``method.temperature: "auto"``: class logits are tempered, probabilities taken as they are.
LOGITS_TEMPERATURE = 4.0
PROBABILITIES_TEMPERATURE = 1.0


def resolved_temperature(temperature: float | str, output_kind: str) -> float:
    """The kd temperature for a teacher whose class outputs are ``output_kind``.

    A teacher's probabilities are already its soft targets. Tempering their logs raises
    them to ``1/T``, and a forest's exact zeros, clamped to :data:`PROBABILITY_FLOOR`
    first, become sizeable targets: students of random forests on three of
    scikit-learn's datasets agreed less with their teachers at ``T = 4`` than at 1. Students
    of torch MLPs, which give logits, agreed more at 4 on the same datasets.
    """
    if temperature != "auto":
        return float(temperature)
    return PROBABILITIES_TEMPERATURE if output_kind == "probabilities" else LOGITS_TEMPERATURE


def teacher_log_probs(teacher_out: Tensor, output_kind: str, temperature: float) -> Tensor:
    """Tempered teacher log-probabilities, in fp32.

    ``logits``: ``log_softmax(z / T)``. ``probabilities``: the log of the clamped
    probabilities is used as logits, ``log_softmax(log p / T)``, so a probability
    teacher and the logits teacher it came from give the same targets;
    probabilities are never softmaxed again as if they were logits.
    """
    logits = teacher_out.float()
    if output_kind == "probabilities":
        logits = torch.log(logits.clamp(min=PROBABILITY_FLOOR))
    elif output_kind != "logits":
        raise TeacherIncompatible(
            f"teacher outputs {output_kind!r}, not class logits or probabilities",
            field="method.name",
        )
    return F.log_softmax(logits / temperature, dim=-1)


class DistillationLoss(nn.Module):
    """Base class: ``forward`` returns named, weighted fp32 terms.

    Subclasses implement :meth:`terms`; this class switches autocast off and casts
    every input to fp32 first. ``teacher_out`` may be None (training on labels
    alone): then only label terms are returned, at full weight.
    """

    #: True when :meth:`forward` needs student and teacher features (hint losses).
    needs_features: bool = False

    def forward(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None,
        labels: Tensor | None = None,
        student_features: Tensor | None = None,
        teacher_features: Tensor | None = None,
    ) -> dict[str, Tensor]:
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            return self.terms(
                student_out.float(),
                None if teacher_out is None else teacher_out.float(),
                labels,
                None if student_features is None else student_features.float().flatten(1),
                None if teacher_features is None else teacher_features.float().flatten(1),
            )

    def terms(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None,
        labels: Tensor | None,
        student_features: Tensor | None,
        teacher_features: Tensor | None,
    ) -> dict[str, Tensor]:
        raise NotImplementedError


LossFactory = Callable[[MethodSpec, LossContext], DistillationLoss]

#: Method name -> ``factory(spec: MethodSpec, context: LossContext) -> DistillationLoss``.
LOSSES: Registry[LossFactory] = Registry("distillation loss")


def _class_label_rows(labels: Tensor) -> Tensor:
    return labels.long() >= 0


def _value_label_rows(labels: Tensor) -> Tensor:
    finite = torch.isfinite(labels.float())
    return finite.reshape(finite.shape[0], -1).all(dim=1)


class _TeacherAndLabelLoss(DistillationLoss):
    """A teacher term plus ``hard``, a loss against the labels over the labeled rows.

    With labels the teacher term has weight alpha and ``hard`` weight 1 - alpha;
    either one alone gets weight 1. ``hard`` is left out when the batch has no
    labeled rows. Subclasses give :meth:`teacher_terms`, :meth:`label_targets` and
    :meth:`label_loss`.
    """

    def __init__(self, alpha: float, use_labels: bool):
        super().__init__()
        self.alpha = alpha
        self.use_labels = use_labels

    def teacher_terms(
        self, student_out: Tensor, teacher_out: Tensor, weight: float
    ) -> dict[str, Tensor]:
        """The teacher term(s), already multiplied by ``weight``."""
        raise NotImplementedError

    def label_targets(self, student_out: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(targets, rows)``: the targets, one per student row, and which rows are labeled."""
        raise NotImplementedError

    def label_loss(self, student_rows: Tensor, target_rows: Tensor) -> Tensor:
        raise NotImplementedError

    def terms(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None,
        labels: Tensor | None,
        student_features: Tensor | None,
        teacher_features: Tensor | None,
    ) -> dict[str, Tensor]:
        labeled = self.use_labels and labels is not None
        out: dict[str, Tensor] = {}
        if teacher_out is not None:
            out.update(self.teacher_terms(student_out, teacher_out, self.alpha if labeled else 1.0))
        if labeled:
            assert labels is not None
            target, rows = self.label_targets(student_out, labels)
            # One host sync per step, to leave the term out rather than report a fake 0.
            if bool(rows.any()):
                loss = self.label_loss(student_out[rows], target[rows])
                out["hard"] = (1.0 - self.alpha if teacher_out is not None else 1.0) * loss
        return out


class KDLoss(_TeacherAndLabelLoss):
    """Hinton knowledge distillation.

    soft = alpha · T² · KL(teacher_T ‖ student_T), ``batchmean`` (summed over classes,
    averaged over rows); the T² keeps gradient size comparable across temperatures.
    hard = (1 - alpha) · cross-entropy(student, labels) over the labeled rows.
    Without labels the soft term gets weight 1.
    """

    def __init__(self, temperature: float, alpha: float, output_kind: str, use_labels: bool):
        super().__init__(alpha, use_labels)
        self.temperature = temperature
        self.output_kind = output_kind

    def teacher_terms(
        self, student_out: Tensor, teacher_out: Tensor, weight: float
    ) -> dict[str, Tensor]:
        temperature = self.temperature
        student_log = F.log_softmax(student_out / temperature, dim=-1)
        teacher_log = teacher_log_probs(teacher_out, self.output_kind, temperature)
        kl = F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)
        return {"soft": weight * temperature * temperature * kl}

    def label_targets(self, student_out: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return labels.long(), _class_label_rows(labels)

    def label_loss(self, student_rows: Tensor, target_rows: Tensor) -> Tensor:
        return F.cross_entropy(student_rows, target_rows)


class RegressionLoss(_TeacherAndLabelLoss):
    """MSE or MAE between student and teacher outputs, plus a labeled term.

    With regression labels the teacher term has weight alpha and ``hard`` (the
    same distance to the labels, over labeled rows) weight 1 - alpha.
    """

    def __init__(self, name: str, alpha: float, use_labels: bool):
        super().__init__(alpha, use_labels)
        self.name = name
        self.distance = F.mse_loss if name == "mse" else F.l1_loss

    def teacher_terms(
        self, student_out: Tensor, teacher_out: Tensor, weight: float
    ) -> dict[str, Tensor]:
        return {self.name: weight * self.distance(student_out, teacher_out)}

    def label_targets(self, student_out: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        target = labels.float().reshape(student_out.shape[0], -1)
        if target.shape[1] != student_out.shape[1]:
            raise DatasetInvalid(
                f"regression labels have {target.shape[1]} values per row but the teacher "
                f"outputs {student_out.shape[1]}",
                field="labels",
            )
        return target, _value_label_rows(target)

    def label_loss(self, student_rows: Tensor, target_rows: Tensor) -> Tensor:
        return self.distance(student_rows, target_rows)


class CosineLoss(DistillationLoss):
    """1 - cosine similarity between student and teacher embeddings, averaged over rows."""

    def terms(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None,
        labels: Tensor | None,
        student_features: Tensor | None,
        teacher_features: Tensor | None,
    ) -> dict[str, Tensor]:
        if teacher_out is None:
            return {}
        return {"cosine": (1.0 - F.cosine_similarity(student_out, teacher_out, dim=-1)).mean()}


class HintLoss(DistillationLoss):
    """FitNets hint: MSE between projected student features and teacher features.

    ``projection`` (student_feature_dim -> teacher_feature_dim) is learned with the
    student: put ``loss.parameters()`` in the optimizer. It is used only in training
    and is not part of the exported student.
    """

    needs_features = True

    def __init__(self, student_feature_dim: int, teacher_feature_dim: int):
        super().__init__()
        self.projection = nn.Linear(student_feature_dim, teacher_feature_dim)

    def terms(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None,
        labels: Tensor | None,
        student_features: Tensor | None,
        teacher_features: Tensor | None,
    ) -> dict[str, Tensor]:
        if student_features is None or teacher_features is None:
            raise ValueError("the hint loss needs student_features and teacher_features")
        return {"hint": F.mse_loss(self.projection(student_features), teacher_features)}


@LOSSES.register("kd")
def build_kd(spec: MethodSpec, context: LossContext) -> DistillationLoss:
    """Knowledge distillation on class logits or probabilities."""
    if context.teacher_output_kind not in CLASS_OUTPUT_KINDS:
        raise TeacherIncompatible(
            f"kd needs a teacher that outputs class logits or probabilities; this teacher "
            f"outputs {context.teacher_output_kind!r} (use mse or cosine)",
            field=context.field,
        )
    temperature = resolved_temperature(spec.temperature, context.teacher_output_kind)
    return KDLoss(temperature, spec.alpha, context.teacher_output_kind, context.has_labels)


def _regression_labels(context: LossContext) -> bool:
    # Only regression labels are targets for the outputs; class ids are not.
    return context.has_labels and context.task == "regression"


@LOSSES.register("mse")
def build_mse(spec: MethodSpec, context: LossContext) -> DistillationLoss:
    """Mean squared error to the teacher's outputs."""
    return RegressionLoss("mse", spec.alpha, _regression_labels(context))


@LOSSES.register("mae")
def build_mae(spec: MethodSpec, context: LossContext) -> DistillationLoss:
    """Mean absolute error to the teacher's outputs."""
    return RegressionLoss("mae", spec.alpha, _regression_labels(context))


@LOSSES.register("cosine")
def build_cosine(spec: MethodSpec, context: LossContext) -> DistillationLoss:
    """Cosine distance to the teacher's embeddings."""
    return CosineLoss()


@LOSSES.register("hint")
def build_hint(spec: MethodSpec, context: LossContext) -> DistillationLoss:
    """Hint (FitNets) loss on intermediate features."""
    if not context.teacher_feature_dim or not context.student_feature_dim:
        raise SpecInvalid(
            "the hint loss needs teacher features: set method.hint_layer to a teacher layer "
            "(or use a teacher whose layers can be read)",
            field="method.hint_layer",
        )
    return HintLoss(context.student_feature_dim, context.teacher_feature_dim)


class CombinedLoss(DistillationLoss):
    """Several losses, each scaled by its weight; their terms are merged by name."""

    def __init__(self, parts: list[tuple[DistillationLoss, float, bool]]):
        super().__init__()
        self.parts = nn.ModuleList(part for part, _, _ in parts)
        self.weights = [w for _, w, _ in parts]
        self.gets_labels = [g for _, _, g in parts]
        self.needs_features = any(part.needs_features for part, _, _ in parts)

    def terms(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None,
        labels: Tensor | None,
        student_features: Tensor | None,
        teacher_features: Tensor | None,
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part, weight, gets_labels in zip(
            self.parts, self.weights, self.gets_labels, strict=True
        ):
            assert isinstance(part, DistillationLoss)
            if teacher_out is None and not gets_labels:
                continue  # training on labels alone: teacher-only terms have nothing to match
            terms = part.terms(
                student_out,
                teacher_out,
                labels if gets_labels else None,
                student_features,
                teacher_features,
            )
            for name, value in terms.items():
                out[name] = value if weight == 1.0 else weight * value
        return out


def _check_task(name: str, task: str) -> None:
    allowed = {
        "kd": ("classification",),
        "cosine": ("embedding",),
        "mse": ("regression", "embedding"),
        "mae": ("regression", "embedding"),
    }.get(name)
    if allowed is not None and task not in allowed:
        raise SpecInvalid(f"method {name} does not fit task {task}", field="method.name")


def build_loss(
    spec: DistillationSpec,
    task: str,
    teacher_output_kind: str,
    has_labels: bool,
    student_feature_dim: int,
    teacher_feature_dim: int | None,
) -> CombinedLoss:
    """The loss a job trains with: the main method plus ``method.extra_terms``.

    The main method (``spec.method_for(task)``) is the only one that sees labels.
    Extra terms are weighted by their ``weight`` and see no labels (an extra kd's
    soft term has weight 1 before that). A main ``hint`` adds the task's default
    output loss unless an extra term already trains the outputs, since a hint
    alone would leave the student's head untrained.
    """
    method = spec.method
    main = spec.method_for(task)
    plan: list[tuple[str, float, bool, str]] = []  # (name, weight, gets labels, field)
    if main == "hint":
        plan.append(("hint", 1.0, False, "method.name"))
        if all(t.name == "hint" for t in method.extra_terms):
            plan.append((DEFAULT_METHOD[task], 1.0, True, "method.name"))
    else:
        _check_task(main, task)
        plan.append((main, 1.0, True, "method.name"))
    plan += [(t.name, t.weight, False, "method.extra_terms") for t in method.extra_terms]
    names = [name for name, _, _, _ in plan]
    if len(set(names)) != len(names):
        raise SpecInvalid(
            f"method terms repeat: {', '.join(names)}; give each loss once",
            field="method.extra_terms",
        )
    parts: list[tuple[DistillationLoss, float, bool]] = []
    for name, weight, gets_labels, field in plan:
        context = LossContext(
            task=task,
            teacher_output_kind=teacher_output_kind,
            has_labels=has_labels and gets_labels,
            student_feature_dim=student_feature_dim,
            teacher_feature_dim=teacher_feature_dim,
            field=field,
        )
        parts.append((LOSSES.get(name, field=field)(method, context), weight, gets_labels))
    return CombinedLoss(parts)


class LabelsOnlyLoss(nn.Module):
    """The baseline's loss: the student learns from labels alone, no teacher.

    Cross-entropy for class ids (``-1`` rows ignored), else MSE to the targets.
    """

    def __init__(self, task: str) -> None:
        super().__init__()
        self.task = task

    def forward(
        self,
        student_out: Tensor,
        teacher_out: Tensor | None = None,
        labels: Tensor | None = None,
        **_: object,
    ) -> dict[str, Tensor]:
        assert labels is not None
        out = student_out.float()
        if self.task == "classification":
            return {"hard": F.cross_entropy(out, labels, ignore_index=-1)}
        return {"hard": F.mse_loss(out, labels.float().reshape(out.shape))}
