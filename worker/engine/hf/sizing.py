"""How big an hf_encoder student is: depth, width and heads chosen against a budget."""

from __future__ import annotations

from typing import Any

import torch

from worker.engine.errors import SpecInvalid
from worker.engine.hf.families import Head, make_model
from worker.engine.spec import StudentSpec


def student_config(
    teacher_config: Any, *, layers: int, hidden: int | None, heads: int | None
) -> Any:
    """A copy of the teacher's config with fewer layers and, optionally, another width."""
    config = type(teacher_config).from_dict(teacher_config.to_dict())
    config.num_hidden_layers = layers
    # Students train and export in fp32 whatever the teacher checkpoint's dtype.
    config.dtype = torch.float32
    if hidden is not None and hidden != teacher_config.hidden_size:
        ratio = _intermediate(teacher_config) / teacher_config.hidden_size
        config.hidden_size = hidden
        _set_intermediate(config, max(1, round(ratio * hidden)))
        if getattr(config, "pooler_hidden_size", None) is not None:
            config.pooler_hidden_size = hidden
        if getattr(config, "embedding_size", None) is not None:
            # ALBERT/ELECTRA factorise embeddings: narrow them in proportion.
            scale = hidden / teacher_config.hidden_size
            config.embedding_size = max(8, round(config.embedding_size * scale))
    if heads is not None:
        config.num_attention_heads = heads
    return config


def _intermediate(config: Any) -> int:
    return int(config.hidden_dim if config.model_type == "distilbert" else config.intermediate_size)


def _set_intermediate(config: Any, value: int) -> None:
    if config.model_type == "distilbert":
        config.hidden_dim = value
    else:
        config.intermediate_size = value


def _count(config: Any, head: Head) -> int:
    """Parameters of a model built from ``config``, counted without allocating weights."""
    with torch.device("meta"):
        model = make_model(config, head, pooler=head != "base")
    return sum(p.numel() for p in model.parameters())


def _heads_for(hidden: int, teacher_config: Any) -> int:
    """Heads of the teacher's head size where possible, else the most that divide ``hidden``."""
    head_dim = teacher_config.hidden_size // teacher_config.num_attention_heads
    heads = max(1, min(hidden // head_dim, teacher_config.num_attention_heads))
    while hidden % heads:
        heads -= 1
    return heads


def choose_size(
    spec: StudentSpec, teacher_config: Any, head: Head, teacher_parameters: int, extra: int
) -> tuple[int, int, int]:
    """(layers, hidden, heads) for the student.

    Knobs given in the spec are kept. ``max_parameters`` (else
    ``teacher_parameters / compression``) is the budget, used to choose the
    knobs left out: fewer layers at the teacher's width first, and a narrower
    model (which then cannot start from the teacher's weights) only when the
    budget requires it. With ``num_layers`` given, ``compression`` is not
    applied: the teacher's width is kept unless ``hidden_size`` or
    ``max_parameters`` says otherwise.
    """
    n = int(teacher_config.num_hidden_layers)
    width = int(teacher_config.hidden_size)
    budget: float | None = None
    if spec.max_parameters is not None:
        budget = float(spec.max_parameters)
    elif spec.num_layers is None and spec.compression is not None:
        budget = teacher_parameters / spec.compression

    def heads_of(h: int) -> int:
        if spec.num_heads is not None:
            if h % spec.num_heads:
                raise SpecInvalid(
                    f"hidden size {h} is not divisible by {spec.num_heads} heads",
                    field="student.num_heads",
                )
            return spec.num_heads
        if h == width:
            return int(teacher_config.num_attention_heads)
        return _heads_for(h, teacher_config)

    if spec.num_layers is not None:
        depths = [spec.num_layers]
    elif budget is None:
        depths = [max(1, n // 2)]
    else:
        depths = list(range(max(1, n - 1), 0, -1))
    if spec.hidden_size is not None:
        widths = [spec.hidden_size]
    elif budget is None:
        widths = [width]
    else:
        head_dim = width // int(teacher_config.num_attention_heads)
        widths = [width, *range(width - head_dim, 0, -head_dim)]

    if budget is None:
        return depths[0], widths[0], heads_of(widths[0])

    fallback: tuple[int, int, int] | None = None
    for h in widths:
        heads = heads_of(h)
        one = _count(student_config(teacher_config, layers=1, hidden=h, heads=heads), head)
        two = _count(student_config(teacher_config, layers=2, hidden=h, heads=heads), head)
        per_layer = two - one
        fits = [k for k in depths if one + (k - 1) * per_layer + extra * h / width <= budget]
        if not fits:
            continue
        if fits[0] >= min(2, depths[0]):
            return fits[0], h, heads
        fallback = fallback or (fits[0], h, heads)
    if fallback is not None:
        return fallback
    field = "student.max_parameters" if spec.max_parameters is not None else "student.compression"
    raise SpecInvalid(
        f"no {teacher_config.model_type} student fits a budget of {int(budget)} parameters "
        "(the vocabulary embeddings alone take more); ask for less compression or give "
        "num_layers and hidden_size",
        field=field,
    )
