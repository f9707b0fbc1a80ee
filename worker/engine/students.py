"""Student architectures, registered by name, and the sizing that fits them to a budget.

Every student is a :class:`Student`: a ``body`` that turns a batch into penultimate
features ``(N, feature_dim)`` and a linear ``head`` from those features to the
teacher's output width. For classification the head gives logits, for regression
values; for embedding teachers it is the *projection head* that maps a narrower
student onto the teacher's embedding space. The head is part of the student: it
is trained, saved and exported with it.

``student.config`` is JSON-able and holds everything :func:`rebuild_student` needs
to rebuild the same parameter shapes without the teacher. ``auto`` picks an
architecture from the modality and sizes its width to the parameter budget
(``max_parameters``, else teacher parameters / ``compression``, else teacher
bytes / ``compression`` at 4 bytes per fp32 parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.compatibility import require_inputs
from worker.engine.errors import SpecInvalid
from worker.engine.preprocessing import wrap_student
from worker.engine.registry import Registry
from worker.engine.spec import StudentSpec


@dataclass
class StudentContext:
    """What a builder knows about the teacher and the data.

    ``saved_config`` is set by :func:`rebuild_student`: a builder given one must
    rebuild exactly that student (no budget search, no teacher). ``token_counts``
    (text only): how often the training rows use each token id, (vocab_size,) int64.
    """

    task: str
    modality: str
    input_shape: tuple[int, ...]
    input_names: list[str]
    output_dim: int
    teacher_parameters: int
    teacher_bytes: int
    vocab_size: int | None = None
    teacher: Any = None
    saved_config: dict[str, Any] | None = None
    token_counts: Any = None
    #: The training rows (inputs by name), for builders that fit part of the student to
    #: the teacher before training on some of them (text only: see
    #: :mod:`worker.engine.hf.bridges`).
    sample_inputs: dict[str, Any] | None = None


StudentBuilder = Callable[[StudentSpec, StudentContext], nn.Module]

#: Architecture name -> ``builder(spec, ctx) -> nn.Module``.
STUDENTS: Registry[StudentBuilder] = Registry("student architecture")

TEXT_INPUTS = ["input_ids", "attention_mask"]
# fp32 parameters: a byte budget (tree ensembles) converts at 4 bytes each.
BYTES_PER_PARAMETER = 4


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) in ``module``; buffers are not counted."""
    return sum(p.numel() for p in module.parameters())


def parameter_budget(spec: StudentSpec, ctx: StudentContext) -> int | None:
    """The most parameters the student may have, or None when nothing bounds it."""
    if spec.max_parameters is not None:
        return spec.max_parameters
    if spec.compression is None:
        return None
    if ctx.teacher_parameters > 0:
        return int(ctx.teacher_parameters / spec.compression)
    if ctx.teacher_bytes > 0:
        return int(ctx.teacher_bytes / spec.compression / BYTES_PER_PARAMETER)
    return None


class Student(nn.Module):
    """Base class: ``body`` gives penultimate features, ``head`` maps them to the output."""

    #: Constructor arguments; together with the context keys they form ``config``.
    KNOBS: tuple[str, ...] = ()
    hint_layer: str = "body"

    def __init__(self, feature_dim: int, output_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.config: dict[str, Any] = {}
        # For embedding tasks this is the projection head onto the teacher's space.
        self.head = nn.Linear(feature_dim, output_dim)

    def _out(self, features: torch.Tensor) -> torch.Tensor:
        # Float32 out even under autocast: losses and metrics expect it.
        return self.head(features).float()


class MLPStudent(Student):
    """Flattens ``inputs`` of any per-sample shape and applies Linear-(LayerNorm)-act blocks."""

    KNOBS = ("in_features", "hidden_sizes", "activation", "layer_norm", "dropout", "output_dim")

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        output_dim: int,
        activation: str = "relu",
        layer_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(hidden_sizes[-1] if hidden_sizes else in_features, output_dim)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden_sizes:
            layers.append(nn.Linear(width, h))
            if layer_norm:
                layers.append(nn.LayerNorm(h))
            layers.append(_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._out(self.body(inputs))


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes: (N, C, H, W) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class CNNStudent(Student):
    """Conv-BN-ReLU stages (every stage after the first halves H and W), global pool, head."""

    KNOBS = ("in_channels", "channels", "dropout", "output_dim")

    def __init__(
        self, in_channels: int, channels: list[int], output_dim: int, dropout: float = 0.0
    ) -> None:
        super().__init__(channels[-1], output_dim)
        layers: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv2d(width, c, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            ]
            width = c
        layers.append(GlobalAvgPool())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._out(self.body(inputs))


class SequencePool(nn.Module):
    """Pools (N, T, H) hidden states to (N, H): mean over valid steps, or the last step.

    Mean pooling uses ``mask`` (1 = valid); without a mask every step is valid.
    Written with arithmetic only (no branches on tensor values) so it exports to
    ONNX with dynamic batch and sequence axes.
    """

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "last":
            return hidden[:, -1]
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class RNNStudent(Student):
    """A unidirectional GRU or LSTM over (N, T, F) sequences or embedded token ids.

    Text uses mean pooling over the valid (``attention_mask``) steps: outputs at
    valid steps of a right-padded sequence do not depend on the padding, so the
    student gives the same answer however the batch was padded. Numeric sequences
    use the last step.
    """

    KNOBS = (
        "in_features",
        "vocab_size",
        "cell",
        "hidden_size",
        "num_layers",
        "pooling",
        "dropout",
        "output_dim",
    )
    hint_layer = "pool"

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        output_dim: int,
        cell: str = "gru",
        in_features: int | None = None,
        vocab_size: int | None = None,
        pooling: str = "last",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(hidden_size, output_dim)
        self.embedding = nn.Embedding(vocab_size, hidden_size) if vocab_size else None
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(
            in_features if vocab_size is None else hidden_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.pool = SequencePool(pooling)

    def forward(
        self,
        inputs: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embedding(input_ids) if self.embedding is not None else inputs
        hidden, _ = self.rnn(x)
        return self._out(self.pool(hidden, attention_mask))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block with hand-written masked self-attention.

    Hand-written rather than ``nn.TransformerEncoderLayer`` because the latter takes
    a nested-tensor fast path in eval mode that does not export cleanly.
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_size: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_size, ffn_size),
            nn.GELU(),
            nn.Linear(ffn_size, hidden_size),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, t, h = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = q.reshape(n, t, heads, h // heads).transpose(1, 2)
        k = k.reshape(n, t, heads, h // heads).transpose(1, 2)
        v = v.reshape(n, t, heads, h // heads).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(h // heads))
        if mask is not None:
            # Finite fill, not -inf: a fully padded row gives a uniform average, not NaN.
            keep = mask.to(torch.bool)[:, None, None, :]
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        attn = self.dropout(F.softmax(scores, dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(n, t, h)
        x = x + self.dropout(self.proj(out))
        return x + self.dropout(self.ffn(self.norm2(x)))


class TransformerStudent(Student):
    """A small encoder: token (or linear) embedding + learned positions, blocks, mean pool."""

    KNOBS = (
        "in_features",
        "vocab_size",
        "max_positions",
        "hidden_size",
        "num_layers",
        "num_heads",
        "ffn_size",
        "dropout",
        "output_dim",
    )
    hint_layer = "pool"

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        max_positions: int,
        output_dim: int,
        ffn_size: int | None = None,
        in_features: int | None = None,
        vocab_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(hidden_size, output_dim)
        if vocab_size:
            self.embed: nn.Module = nn.Embedding(vocab_size, hidden_size)
        else:
            self.embed = nn.Linear(int(in_features or 1), hidden_size)
        self.positions = nn.Embedding(max_positions, hidden_size)
        ffn = ffn_size or 4 * hidden_size
        self.blocks = nn.ModuleList(
            EncoderBlock(hidden_size, num_heads, ffn, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.pool = SequencePool("mean")

    def forward(
        self,
        inputs: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.embed(input_ids if input_ids is not None else inputs)
        # arange over the traced length keeps the sequence axis dynamic in ONNX.
        pos = torch.arange(x.shape[1], device=x.device)
        x = x + self.positions(pos).unsqueeze(0)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self._out(self.pool(self.norm(x), attention_mask))


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    raise SpecInvalid(f"unknown activation {name!r}; known: gelu, relu", field="student")


# --- sizing ---------------------------------------------------------------------------

MakeKnobs = Callable[[int], dict[str, Any]]


def _meta_parameters(cls: type[Student], knobs: dict[str, Any]) -> int:
    # The meta device allocates nothing, so probing wide candidates is cheap.
    with torch.device("meta"):
        return count_parameters(cls(**knobs))


def _fit_width(
    cls: type[Student], make: MakeKnobs, floor: int, cap: int, budget: int
) -> tuple[int, bool]:
    """The largest width in [floor, cap] whose student has at most ``budget`` parameters.

    Returns (width, budget_met); when even ``floor`` is too big, (floor, False).
    Parameter counts grow with width, so a binary search finds it.
    """
    if _meta_parameters(cls, make(floor)) > budget:
        return floor, False
    if _meta_parameters(cls, make(cap)) <= budget:
        return cap, True
    lo, hi = floor, cap  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _meta_parameters(cls, make(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, True


def _finish(
    cls: type[Student],
    knobs: dict[str, Any],
    spec: StudentSpec,
    ctx: StudentContext,
    architecture: str,
) -> Student:
    budget = parameter_budget(spec, ctx)
    student = cls(**knobs)
    params = count_parameters(student)
    student.config = {
        "architecture": architecture,
        "requested_architecture": spec.architecture,
        "task": ctx.task,
        "modality": ctx.modality,
        "input_names": _input_names(ctx),
        "input_shape": list(ctx.input_shape),
        **{k: knobs.get(k) for k in cls.KNOBS},
        "parameters": params,
        "parameter_budget": budget,
        "budget_met": budget is None or params <= budget,
    }
    return student


def _from_saved(cls: type[Student], config: dict[str, Any]) -> Student:
    knobs = {k: config[k] for k in cls.KNOBS if config.get(k) is not None}
    try:
        student = cls(**knobs)
    except (TypeError, ValueError) as exc:
        raise SpecInvalid(f"student config does not rebuild: {exc}", field="architecture") from None
    student.config = dict(config)
    return student


def _sized(
    cls: type[Student],
    spec: StudentSpec,
    ctx: StudentContext,
    architecture: str,
    make: MakeKnobs,
    width: int | None,
    floor: int,
    cap: int,
    default: int,
) -> Student:
    """Build ``cls`` at ``width`` if given, else at the widest size the budget allows."""
    budget = parameter_budget(spec, ctx)
    if width is None:
        width = default if budget is None else _fit_width(cls, make, floor, cap, budget)[0]
    return _finish(cls, make(width), spec, ctx, architecture)


def _prod(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape)) if shape else 1


def _require(architecture: str, ctx: StudentContext) -> None:
    require_inputs(
        architecture, text=_is_text(ctx), shape=tuple(ctx.input_shape), modality=ctx.modality
    )


def _is_text(ctx: StudentContext) -> bool:
    return "input_ids" in ctx.input_names


def _vocab(ctx: StudentContext, architecture: str) -> int:
    if not ctx.vocab_size:
        raise SpecInvalid(
            f"student {architecture} on text needs the tokenizer's vocabulary size",
            field="student.architecture",
        )
    return ctx.vocab_size


def _input_names(ctx: StudentContext) -> list[str]:
    # Text students read only ids and mask (token_type_ids is accepted and ignored), so
    # only those become inputs of the exported graph.
    if _is_text(ctx):
        return [n for n in ctx.input_names if n in TEXT_INPUTS]
    return list(ctx.input_names)


@STUDENTS.register("mlp")
def build_mlp(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
    """MLP on flattened ``inputs``; default design is two hidden layers of equal width."""
    if ctx.saved_config is not None:
        return _from_saved(MLPStudent, ctx.saved_config)
    _require("mlp", ctx)
    base = {
        "in_features": _prod(ctx.input_shape),
        "output_dim": ctx.output_dim,
        "activation": "relu",
        "layer_norm": False,
        "dropout": spec.dropout,
    }
    if spec.hidden_sizes:
        return _finish(
            MLPStudent, {**base, "hidden_sizes": list(spec.hidden_sizes)}, spec, ctx, "mlp"
        )

    def make(w: int) -> dict[str, Any]:
        return {**base, "hidden_sizes": [w, w]}

    return _sized(MLPStudent, spec, ctx, "mlp", make, None, floor=8, cap=4096, default=256)


def _cnn_stages(ctx: StudentContext) -> int:
    # One stage per halving the image can take, 1 to 4: 8x8 -> 3, 32x32 -> 4.
    side = min(ctx.input_shape[1], ctx.input_shape[2])
    return max(1, min(4, int(math.log2(max(side, 1)))))


@STUDENTS.register("cnn")
def build_cnn(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
    """CNN for (C, H, W) images; default channels double each stage from a searched base."""
    if ctx.saved_config is not None:
        return _from_saved(CNNStudent, ctx.saved_config)
    _require("cnn", ctx)
    base = {
        "in_channels": ctx.input_shape[0],
        "output_dim": ctx.output_dim,
        "dropout": spec.dropout,
    }
    if spec.channels:
        return _finish(CNNStudent, {**base, "channels": list(spec.channels)}, spec, ctx, "cnn")
    stages = _cnn_stages(ctx)

    def make(w: int) -> dict[str, Any]:
        return {**base, "channels": [w * 2**i for i in range(stages)]}

    return _sized(CNNStudent, spec, ctx, "cnn", make, None, floor=4, cap=512, default=16)


@STUDENTS.register("rnn")
def build_rnn(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
    """GRU/LSTM over (T, F) sequences, or over embedded tokens for text."""
    if ctx.saved_config is not None:
        return _from_saved(RNNStudent, ctx.saved_config)
    text = _is_text(ctx)
    _require("rnn", ctx)
    base: dict[str, Any] = {
        "cell": spec.cell,
        "num_layers": spec.num_layers or 1,
        "output_dim": ctx.output_dim,
        "dropout": spec.dropout,
    }
    if text:
        base.update(vocab_size=_vocab(ctx, "rnn"), pooling="mean")
    else:
        base.update(in_features=ctx.input_shape[1], pooling="last")

    def make(w: int) -> dict[str, Any]:
        return {**base, "hidden_size": w}

    return _sized(RNNStudent, spec, ctx, "rnn", make, spec.hidden_size, 8, 4096, default=128)


def _default_heads(hidden_size: int) -> int:
    # Most heads (up to 8) that divide the width and keep heads at least 8 wide.
    for heads in (8, 4, 2):
        if hidden_size % heads == 0 and hidden_size // heads >= 8:
            return heads
    return 1


@STUDENTS.register("transformer")
def build_transformer(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
    """Small encoder for text (token + position embeddings) or (T, F) sequences."""
    if ctx.saved_config is not None:
        return _from_saved(TransformerStudent, ctx.saved_config)
    text = _is_text(ctx)
    _require("transformer", ctx)
    heads = spec.num_heads
    if spec.hidden_size is not None and heads is not None and spec.hidden_size % heads:
        raise SpecInvalid(
            f"hidden_size {spec.hidden_size} is not divisible by num_heads {heads}",
            field="student.num_heads",
        )
    base: dict[str, Any] = {
        "num_layers": spec.num_layers or 2,
        "output_dim": ctx.output_dim,
        "dropout": spec.dropout,
        "max_positions": ctx.input_shape[0],
    }
    if text:
        base["vocab_size"] = _vocab(ctx, "transformer")
    else:
        base["in_features"] = ctx.input_shape[1]

    def knobs_for(h: int) -> dict[str, Any]:
        return {
            **base,
            "hidden_size": h,
            "num_heads": heads or _default_heads(h),
            "ffn_size": 4 * h,
        }

    if spec.hidden_size is not None:
        return _finish(TransformerStudent, knobs_for(spec.hidden_size), spec, ctx, "transformer")
    # Widths are searched in steps that the head count divides (16 wide at least).
    step = heads or 4
    floor = -(-16 // step)

    def make(units: int) -> dict[str, Any]:
        return knobs_for(units * step)

    return _sized(
        TransformerStudent,
        spec,
        ctx,
        "transformer",
        make,
        None,
        floor=floor,
        cap=max(floor, 2048 // step),
        default=max(floor, 64 // step),
    )


AUTO_BY_MODALITY = {"tabular": "mlp", "image": "cnn", "sequence": "rnn", "text": "transformer"}


def _hf_builder(ctx: StudentContext) -> StudentBuilder | None:
    """The transformers-initialised text student, when the teacher is a transformers model."""
    signature = getattr(ctx.teacher, "signature", None)
    if getattr(signature, "format", None) != "huggingface":
        return None
    return STUDENTS.get("hf_encoder") if "hf_encoder" in STUDENTS else None


@STUDENTS.register("auto")
def build_auto(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
    """Pick the architecture from the modality, then size it to the budget.

    tabular -> mlp, image -> cnn, sequence -> rnn, text -> transformer (or the
    registered ``hf_encoder`` when the teacher is a transformers model).
    """
    if ctx.modality == "text":
        hf = _hf_builder(ctx)
        if hf is not None:
            return hf(spec, ctx)
    try:
        name = AUTO_BY_MODALITY[ctx.modality]
    except KeyError:
        raise SpecInvalid(
            f"no automatic student for modality {ctx.modality!r}", field="student.architecture"
        ) from None
    return STUDENTS.get(name)(spec, ctx)


def build_student(spec: StudentSpec, ctx: StudentContext) -> nn.Module:
    """Build the student ``spec`` asks for; see the module docstring for sizing."""
    return STUDENTS.get(spec.architecture, field="student.architecture")(spec, ctx)


_SPEC_KNOBS = (
    "hidden_sizes",
    "channels",
    "hidden_size",
    "num_layers",
    "num_heads",
    "cell",
    "dropout",
)


def rebuild_student(config: dict[str, Any]) -> nn.Module:
    """Rebuild a student from its saved ``config`` (student_config.json), without the teacher.

    Dispatches on ``config["architecture"]`` through :data:`STUDENTS` (``hf_encoder``
    is there once :mod:`worker.engine.components` is imported). The builder gets a
    context with ``saved_config=config`` and must rebuild exactly that student.
    Weights are not restored: load them with ``load_state_dict``. A config with
    ``preprocessing`` rebuilds the student inside its :class:`PreprocessedStudent`.
    """
    preprocessing = config.get("preprocessing")
    if preprocessing:
        inner = {key: value for key, value in config.items() if key != "preprocessing"}
        return wrap_student(rebuild_student(inner), preprocessing)
    try:
        architecture = str(config["architecture"])
        ctx = StudentContext(
            task=str(config.get("task", "")),
            modality=str(config.get("modality", "")),
            input_shape=tuple(int(d) for d in config.get("input_shape", [])),
            input_names=list(config["input_names"]),
            output_dim=int(config["output_dim"]),
            teacher_parameters=0,
            teacher_bytes=0,
            vocab_size=config.get("vocab_size"),
            saved_config=config,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecInvalid(f"student config is incomplete: {exc}", field="architecture") from None
    builder = STUDENTS.get(architecture, field="architecture")
    knobs = {k: config[k] for k in _SPEC_KNOBS if config.get(k) is not None}
    try:
        spec = StudentSpec(**knobs, compression=None, init_from_teacher=False)
    except ValueError:
        # Config-only knobs outside the API's limits still rebuild through saved_config.
        spec = StudentSpec(compression=None, init_from_teacher=False)
    return builder(spec, ctx)
