"""How big an hf_encoder student is: depth, width and heads chosen against a budget."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.errors import SpecInvalid
from worker.engine.hf.families import Head, make_model
from worker.engine.spec import StudentSpec


def student_config(
    teacher_config: Any,
    *,
    layers: int,
    hidden: int | None,
    heads: int | None,
    feed_forward: int | None = None,
    dropout: float | None = None,
) -> Any:
    """A copy of the teacher's config with fewer layers and, optionally, another width.

    ``feed_forward`` narrows the feed-forward layers of a teacher-width student (their
    units pruned from the teacher's; see :func:`choose_factorised_size`). ``dropout``
    (``student.dropout``) replaces every dropout rate the teacher's config sets, so a
    student does not inherit the rate its teacher was pretrained with.
    """
    config = type(teacher_config).from_dict(teacher_config.to_dict())
    config.num_hidden_layers = layers
    # Students train and export in fp32 whatever the teacher checkpoint's dtype.
    config.dtype = torch.float32
    if dropout is not None:
        for name, value in config.to_dict().items():
            # Rates the config leaves at None (classifier_dropout) fall back to these.
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, dropout)
    if feed_forward is not None:
        _set_intermediate_size(config, feed_forward)
    if hidden is not None and hidden != teacher_config.hidden_size:
        ratio = intermediate_size(teacher_config) / teacher_config.hidden_size
        config.hidden_size = hidden
        _set_intermediate_size(config, max(1, round(ratio * hidden)))
        if getattr(config, "pooler_hidden_size", None) is not None:
            config.pooler_hidden_size = hidden
        if getattr(config, "embedding_size", None) is not None:
            # ALBERT/ELECTRA factorise embeddings: narrow them in proportion.
            scale = hidden / teacher_config.hidden_size
            config.embedding_size = max(8, round(config.embedding_size * scale))
    if heads is not None:
        config.num_attention_heads = heads
    return config


def choose_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers that initialise the student: evenly spaced, first and last kept.

    6 of 12 gives DistilBERT's [0, 2, 4, 7, 9, 11]; 2 of 4 gives [0, 3]. One layer is
    the teacher's last, which then takes the embeddings' output through a bridge
    (:mod:`~worker.engine.hf.bridges`): all-MiniLM-L6-v2's layer 0 alone gives
    embeddings of mean cosine 0.21 to the teacher's on held-out sentences, its layer 5
    behind a bridge 0.76.
    """
    if student_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(index * step) for index in range(student_layers)]


def bridges_of(teacher_config: Any, layers: int, width: int | None = None) -> int:
    """Parameters of the :mod:`~worker.engine.hf.bridges` of a student of ``layers`` seeded
    from the teacher's, at the teacher's width or ``width`` (none for ALBERT, whose layers
    are shared)."""
    from worker.engine.hf.bridges import bridge_parameters

    if teacher_config.model_type == "albert" or layers > teacher_config.num_hidden_layers:
        return 0
    chosen = choose_layers(int(teacher_config.num_hidden_layers), layers)
    return bridge_parameters(chosen, width or int(teacher_config.hidden_size))


def intermediate_size(config: Any) -> int:
    """Width of the feed-forward layers (DistilBERT calls it ``hidden_dim``)."""
    return int(config.hidden_dim if config.model_type == "distilbert" else config.intermediate_size)


def _set_intermediate_size(config: Any, value: int) -> None:
    """Set the feed-forward width under the family's own name for it."""
    if config.model_type == "distilbert":
        config.hidden_dim = value
    else:
        config.intermediate_size = value


def _parameter_count(config: Any, head: Head) -> int:
    """Parameters of a model built from ``config``, counted without allocating weights."""
    with torch.device("meta"):
        model = make_model(config, head, pooler=head != "base")
    return sum(parameter.numel() for parameter in model.parameters())


def choose_size(
    spec: StudentSpec,
    teacher_config: Any,
    head: Head,
    teacher_parameters: int,
    dense_parameters: int,
    dense_of: Callable[[int], int] | None = None,
) -> tuple[int, int, int]:
    """(layers, hidden, heads) for the student.

    Knobs given in the spec are kept. ``max_parameters`` (else
    ``teacher_parameters / compression``) is the budget, used to choose the
    knobs left out: fewer layers at the teacher's width first, and a narrower
    model (which then cannot start from the teacher's weights) only when the
    budget requires it. With ``num_layers`` given, ``compression`` is not
    applied: the teacher's width is kept unless ``hidden_size`` or
    ``max_parameters`` says otherwise. ``dense_parameters`` (the teacher's
    Dense layers) count in proportion to the student's width; ``dense_of(width)``, where
    given, counts instead what a student of that width ends in (a narrower embedding
    student's projection to the teacher's width included).
    """
    width = int(teacher_config.hidden_size)
    budget = _budget(spec, teacher_parameters)
    depths = _depths(spec, int(teacher_config.num_hidden_layers), budget)
    widths = _widths(spec, teacher_config, budget)
    if budget is None:
        return depths[0], widths[0], _student_heads(spec, widths[0], teacher_config)
    fallback: tuple[int, int, int] | None = None
    for hidden in widths:
        heads = _student_heads(spec, hidden, teacher_config)
        one_layer = _parameter_count(
            student_config(teacher_config, layers=1, hidden=hidden, heads=heads), head
        )
        two_layers = _parameter_count(
            student_config(teacher_config, layers=2, hidden=hidden, heads=heads), head
        )
        per_layer = two_layers - one_layer
        dense_share = dense_of(hidden) if dense_of else dense_parameters * hidden / width
        seeded = (spec.init_from_teacher and hidden == width) or cut_to_asked_width(
            spec, teacher_config, hidden, heads
        )
        fits = [
            depth
            for depth in depths
            if one_layer
            + (depth - 1) * per_layer
            + dense_share
            + (bridges_of(teacher_config, depth, hidden) if seeded else 0)
            <= budget
        ]
        if not fits:
            continue
        if fits[0] >= min(2, depths[0]):
            return fits[0], hidden, heads
        # A one-layer student at this width fits, but a narrower one may keep two layers.
        fallback = fallback or (fits[0], hidden, heads)
    if fallback is not None:
        return fallback
    field = "student.max_parameters" if spec.max_parameters is not None else "student.compression"
    raise SpecInvalid(
        f"no {teacher_config.model_type} student fits a budget of {int(budget)} parameters "
        "(the vocabulary embeddings alone take more); ask for less compression or give "
        "num_layers and hidden_size",
        field=field,
    )


def cut_to_asked_width(spec: StudentSpec, teacher_config: Any, hidden: int, heads: int) -> bool:
    """Whether a student of the width the spec asks for (``hidden_size``, or ``num_heads``)
    is cut from the teacher (:mod:`~worker.engine.hf.pruning`) rather than started from
    random weights: it starts from the teacher (``init_from_teacher``), is narrower, has
    ``heads`` of the teacher's head size, and the teacher's layers can be cut.
    """
    width = int(teacher_config.hidden_size)
    head_dim = width // int(teacher_config.num_attention_heads)
    return (
        spec.init_from_teacher
        and (spec.hidden_size is not None or spec.num_heads is not None)
        and cuttable(teacher_config)
        and hidden < width
        and hidden == heads * head_dim
    )


def cuttable(teacher_config: Any) -> bool:
    """Whether a narrower student can be cut from this teacher's layers: a family whose
    parameters :mod:`~worker.engine.hf.pruning` names, whose word embeddings are as wide as
    its layers (a small ELECTRA's are narrower, behind a projection), and no convolution
    beside its first layer (the larger DeBERTa-v2s)."""
    from worker.engine.hf.pruning import PRUNABLE_FAMILIES

    embedding = getattr(teacher_config, "embedding_size", None)
    return (
        teacher_config.model_type in PRUNABLE_FAMILIES
        and embedding in (None, teacher_config.hidden_size)
        and not getattr(teacher_config, "conv_kernel_size", 0)
    )


def _budget(spec: StudentSpec, teacher_parameters: int) -> float | None:
    """``max_parameters``, else teacher parameters / ``compression`` when no depth is given."""
    if spec.max_parameters is not None:
        return float(spec.max_parameters)
    if spec.num_layers is None and spec.compression is not None:
        return teacher_parameters / spec.compression
    return None


def _depths(spec: StudentSpec, teacher_layers: int, budget: float | None) -> list[int]:
    """Depths to try, deepest first: the spec's, else half the teacher's without a budget."""
    if spec.num_layers is not None:
        return [spec.num_layers]
    if budget is None:
        return [max(1, teacher_layers // 2)]
    return list(range(max(1, teacher_layers - 1), 0, -1))


def _widths(spec: StudentSpec, teacher_config: Any, budget: float | None) -> list[int]:
    """Widths to try, widest first: the spec's, else the teacher's and then one head less each."""
    width = int(teacher_config.hidden_size)
    if spec.hidden_size is not None:
        return [spec.hidden_size]
    if budget is None:
        return [width]
    head_dim = width // int(teacher_config.num_attention_heads)
    return [width, *range(width - head_dim, 0, -head_dim)]


def _student_heads(spec: StudentSpec, hidden: int, teacher_config: Any) -> int:
    """The spec's heads (they must divide ``hidden``), else the teacher's at its own width."""
    if spec.num_heads is not None:
        if hidden % spec.num_heads:
            raise SpecInvalid(
                f"hidden size {hidden} is not divisible by {spec.num_heads} heads",
                field="student.num_heads",
            )
        return spec.num_heads
    if hidden == int(teacher_config.hidden_size):
        return int(teacher_config.num_attention_heads)
    return _heads_of_teacher_size(hidden, teacher_config)


def _heads_of_teacher_size(hidden: int, teacher_config: Any) -> int:
    """Heads of the teacher's head size where possible, else the most that divide ``hidden``."""
    head_dim = teacher_config.hidden_size // teacher_config.num_attention_heads
    heads = max(1, min(hidden // head_dim, teacher_config.num_attention_heads))
    while hidden % heads:
        heads -= 1
    return heads


#: The least rank worth factorising word embeddings to; a smaller budget gets a narrower student.
MIN_EMBEDDING_RANK = 16
#: The share of a factorised embedding's budget spent on full-width rows of frequent tokens.
FREQUENT_SHARE = 0.6
#: The narrowest pruned feed-forward layer, as a share of the teacher's width; a smaller
#: budget gets a narrower student.
MIN_FEED_FORWARD_SHARE = 0.5
#: Pruned feed-forward widths are multiples of this.
FEED_FORWARD_STEP = 8


@dataclass(frozen=True)
class FactorisedSize:
    """A teacher-width student with factorised word embeddings (:func:`choose_factorised_size`)."""

    layers: int
    rank: int
    frequent_tokens: int
    #: Units of each feed-forward layer: the teacher's, or fewer where they were pruned.
    feed_forward: int


def choose_factorised_size(
    spec: StudentSpec,
    teacher_config: Any,
    head: Head,
    teacher_parameters: int,
    dense_parameters: int,
    used_tokens: int,
) -> FactorisedSize | None:
    """A teacher-width student with factorised word embeddings that fits the budget.

    The student keeps the teacher's width and heads, so every layer it keeps
    starts from the teacher's, and its word embeddings become a
    :class:`~worker.engine.hf.embeddings.FactorisedEmbedding`: what the budget
    leaves after the layers, position embeddings and Dense layers goes
    :data:`FREQUENT_SHARE` to full-width rows of the transfer set's most used
    tokens (at most ``used_tokens`` of them) and the rest to the low-rank table.
    The deepest student (``num_layers`` if given) whose rank is at least
    :data:`MIN_EMBEDDING_RANK` wins. Where no depth fits with the teacher's
    feed-forward layers, the shallowest one whose feed-forward layers, pruned to the
    widest multiple of :data:`FEED_FORWARD_STEP` that leaves that rank (and no
    narrower than :data:`MIN_FEED_FORWARD_SHARE` of the width), fit wins: it keeps
    the most units of each layer (all-MiniLM-L6-v2 at 7x: one layer of 1,384 units
    gave a held-out cosine of 0.763 after 256 steps, two layers of 304 gave 0.750), and
    its layers still start from the teacher's, keeping their most important units.
    Where even that leaves too little, the deepest one whose feed-forward layers are at
    that floor and whose word embeddings keep fewer frequent rows (or none) than
    :data:`FREQUENT_SHARE` would give, at rank :data:`MIN_EMBEDDING_RANK` or more, wins.
    None when nothing fits (or nothing bounds the student).
    """
    from worker.engine.hf.embeddings import factorised_parameters

    budget = _budget(spec, teacher_parameters)
    if budget is None:
        return None
    width = int(teacher_config.hidden_size)
    vocab = int(teacher_config.vocab_size)
    teacher_layers = int(teacher_config.num_hidden_layers)
    full = intermediate_size(teacher_config)
    depths = _seeded_depths(spec, teacher_layers)
    # Whatever the embedding table needs at the least rank, with its frequent rows.
    least = _least_factorised_embeddings(width, vocab, used_tokens)
    floor = math.ceil(max(1, round(MIN_FEED_FORWARD_SHARE * width)) / FEED_FORWARD_STEP)
    floor = min(full, floor * FEED_FORWARD_STEP)
    for pruned, tight in ((False, False), (True, False), (True, True)):
        for depth in depths[::-1] if pruned and not tight else depths:
            feed_forward = floor if tight else full
            rest = _rest_of_factorised(teacher_config, head, depth, dense_parameters, feed_forward)
            if pruned and not tight:
                # Each feed-forward unit is an input row, its bias and an output column.
                per_unit = depth * (2 * width + 1)
                cut = math.ceil((rest + least - budget) / per_unit)
                feed_forward = (full - max(cut, 1)) // FEED_FORWARD_STEP * FEED_FORWARD_STEP
                if feed_forward < floor:
                    continue
                rest = _rest_of_factorised(
                    teacher_config, head, depth, dense_parameters, feed_forward
                )
            split = _tight_split if tight else _factorised_split
            rank, frequent = split(budget - rest, width, vocab, used_tokens)
            if rank < MIN_EMBEDDING_RANK:
                continue
            assert factorised_parameters(vocab, width, rank, frequent) + rest <= budget
            return FactorisedSize(depth, rank, frequent, feed_forward)
    return None


def _seeded_depths(spec: StudentSpec, teacher_layers: int) -> list[int]:
    """Depths of a student seeded from the teacher's layers, deepest first: ``num_layers``
    if given (and no deeper than the teacher), else every depth below the teacher's."""
    if spec.num_layers is not None:
        return [spec.num_layers] if spec.num_layers <= teacher_layers else []
    return list(range(max(1, teacher_layers - 1), 0, -1))


def _least_factorised_embeddings(width: int, vocab: int, used_tokens: int) -> int:
    """The fewest parameters of word embeddings whose :func:`_factorised_split` rank is
    :data:`MIN_EMBEDDING_RANK` (found by bisection: the split is monotone in its budget)."""
    low, high = 0, (vocab + width) * (MIN_EMBEDDING_RANK + 1) * 4
    while high - low > 1:
        middle = (low + high) // 2
        if _factorised_split(middle, width, vocab, used_tokens)[0] >= MIN_EMBEDDING_RANK:
            high = middle
        else:
            low = middle
    return high


def _rest_of_factorised(
    teacher_config: Any,
    head: Head,
    depth: int,
    dense_parameters: int,
    feed_forward: int | None = None,
) -> int:
    """Parameters of a teacher-width student of ``depth`` layers seeded from the teacher's
    (its bridges too), word embeddings left out."""
    config = student_config(
        teacher_config, layers=depth, hidden=None, heads=None, feed_forward=feed_forward
    )
    width, vocab = int(teacher_config.hidden_size), int(teacher_config.vocab_size)
    return (
        _parameter_count(config, head)
        - vocab * width
        + dense_parameters
        + bridges_of(teacher_config, depth)
    )


def _factorised_split(left: float, width: int, vocab: int, used_tokens: int) -> tuple[int, int]:
    """(rank, frequent_tokens) that ``left`` parameters of word embeddings buy."""
    frequent = max(0, min(used_tokens, int(left * FREQUENT_SHARE / width) - 1))
    rank = int((left - (frequent + 1) * width) // (vocab + width))
    # A table has no more singular vectors than its width: a larger rank buys nothing.
    return min(rank, width), frequent


def _tight_split(left: float, width: int, vocab: int, used_tokens: int) -> tuple[int, int]:
    """(rank, frequent_tokens) that ``left`` parameters of word embeddings buy when they
    are few: :data:`MIN_EMBEDDING_RANK` first, and full-width rows with what remains."""
    least_rank = MIN_EMBEDDING_RANK * (vocab + width)
    frequent = max(0, min(used_tokens, int((left - least_rank) // width) - 1))
    rank = int((left - (frequent + 1) * width) // (vocab + width))
    return min(rank, width), frequent


@dataclass(frozen=True)
class PrunedSize:
    """A narrower student cut from the teacher's layers (:func:`choose_pruned_size`)."""

    layers: int
    hidden: int
    heads: int
    rank: int
    frequent_tokens: int


def choose_pruned_size(
    spec: StudentSpec,
    teacher_config: Any,
    head: Head,
    teacher_parameters: int,
    dense_of: Callable[[int], int],
    used_tokens: int,
) -> PrunedSize | None:
    """A narrower student, cut from the teacher's layers, that fits the budget.

    For a budget no teacher-width student fits (:func:`choose_factorised_size`): the
    widest student of whole teacher heads (one head less each try) that fits, at that
    width the deepest, its feed-forward layers in the teacher's proportion to the width
    and its word embeddings factorised (rank :data:`MIN_EMBEDDING_RANK` or more; full rows
    for frequent tokens as :func:`choose_factorised_size` gives them, else fewer). Each
    part is cut from the teacher's (:mod:`~worker.engine.hf.pruning`), its bridges
    counted. ``dense_of(width)`` is what the Dense layers (or the projection to the
    teacher's embedding width) of a student of that width take. None when nothing fits,
    nothing bounds the student, the spec sets its width or heads, or the family's layers
    cannot be cut.
    """
    budget = _budget(spec, teacher_parameters)
    if (
        budget is None
        or not cuttable(teacher_config)
        or not spec.init_from_teacher
        or spec.hidden_size is not None
        or spec.num_heads is not None
    ):
        return None
    width = int(teacher_config.hidden_size)
    teacher_heads = int(teacher_config.num_attention_heads)
    head_dim = width // teacher_heads
    vocab = int(teacher_config.vocab_size)
    teacher_layers = int(teacher_config.num_hidden_layers)
    depths = _seeded_depths(spec, teacher_layers)
    for heads in range(teacher_heads - 1, 0, -1):
        hidden = heads * head_dim
        one, two = (
            _parameter_count(
                student_config(teacher_config, layers=layers, hidden=hidden, heads=heads), head
            )
            - vocab * hidden
            for layers in (1, 2)
        )
        for split in (_factorised_split, _tight_split):
            for depth in depths:
                rest = (
                    one
                    + (depth - 1) * (two - one)
                    + dense_of(hidden)
                    + bridges_of(teacher_config, depth, hidden)
                )
                rank, frequent = split(budget - rest, hidden, vocab, used_tokens)
                if rank >= MIN_EMBEDDING_RANK:
                    return PrunedSize(depth, hidden, heads, rank, frequent)
    return None


def choose_cut_depth(
    spec: StudentSpec,
    teacher_config: Any,
    head: Head,
    teacher_parameters: int,
    dense_parameters: int,
    used_tokens: int,
) -> int:
    """Layers of a teacher-width student whose vocabulary is cut to ``used_tokens`` rows.

    ``student.vocabulary: "transfer"``: the word embeddings keep one row per token
    the transfer set uses (plus a shared one), and the deepest student (below the
    teacher's depth; ``num_layers`` if given, else half the teacher's when nothing
    bounds it) that fits the budget with them wins.
    """
    from worker.engine.hf.embeddings import cut_parameters

    width = int(teacher_config.hidden_size)
    vocab = int(teacher_config.vocab_size)
    teacher_layers = int(teacher_config.num_hidden_layers)
    budget = _budget(spec, teacher_parameters)
    if spec.num_layers is not None:
        depths = [spec.num_layers]
    elif budget is None:
        depths = [max(1, teacher_layers // 2)]
    else:
        depths = list(range(max(1, teacher_layers - 1), 0, -1))
    table = cut_parameters(width, used_tokens)
    for depth in depths:
        config = student_config(teacher_config, layers=depth, hidden=None, heads=None)
        total = (
            _parameter_count(config, head)
            - vocab * width
            + dense_parameters
            + table
            + bridges_of(teacher_config, depth)
        )
        if budget is None or total <= budget:
            return depth
    field = "student.max_parameters" if spec.max_parameters is not None else "student.compression"
    raise SpecInvalid(
        f"no {teacher_config.model_type} student with the transfer set's {used_tokens} tokens "
        f"fits a budget of {int(budget or 0)} parameters; ask for less compression or "
        'leave student.vocabulary at "teacher"',
        field=field,
    )


def largest_compression_from_teacher(
    teacher_config: Any,
    head: Head,
    teacher_parameters: int,
    dense_parameters: int,
    used_tokens: int,
    dense_of: Callable[[int], int] | None = None,
) -> float:
    """The largest ``student.compression`` at which the student still starts from the teacher.

    That is, at which :func:`choose_factorised_size` still finds a teacher-width
    student (its one-layer student, feed-forward layers pruned to the least it
    allows, with rank :data:`MIN_EMBEDDING_RANK`) or, given ``dense_of`` (see
    :func:`choose_pruned_size`), one cut from the teacher still fits, found by
    bisection and rounded down to a tenth. Any larger compression gets a narrower
    student trained from random weights. 1.0 when none fits at all.
    """

    def fits(compression: float) -> bool:
        spec = StudentSpec(compression=compression)
        size = choose_factorised_size(
            spec, teacher_config, head, teacher_parameters, dense_parameters, used_tokens
        )
        if size is not None:
            return True
        return dense_of is not None and (
            choose_pruned_size(
                spec, teacher_config, head, teacher_parameters, dense_of, used_tokens
            )
            is not None
        )

    low, high = 1.0, 2.0
    if not fits(low):
        return low
    while fits(high) and high < 1e6:
        low, high = high, high * 2
    while high - low > 0.01:
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return math.floor(low * 10) / 10
