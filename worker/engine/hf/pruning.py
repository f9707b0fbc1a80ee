"""A narrower student seeded from the teacher: its most important channels, heads and units.

Past the largest compression at which a student keeps the teacher's width (one layer,
factorised word embeddings; 14.3 for all-MiniLM-L6-v2), the student has to be narrower,
and a narrower transformer cannot take the teacher's weights as they are. It can take a
slice of them: the channels of the residual stream that carry the most (mean squared
token state over every layer's output, on transfer-set rows), in each kept layer the
attention heads whose output weighs most (mean norm of the head's context vectors
times the norm of its block of the output projection) and the feed-forward units that
weigh most (mean absolute activation times the norm of the unit's output column). Every
weight of the student is then the teacher's, cut to those rows and columns; the word
embeddings are factorised from the teacher's table cut to the kept channels, a skipped
layer is bridged as at full width (:mod:`~worker.engine.hf.bridges`, fitted on the kept
channels), and the projection that gives the teacher's embedding width back is fitted
by ridge regression on the transfer-set rows. Untrained, all-MiniLM-L6-v2 cut to 192
channels (6 of 12 heads) in all six layers gives held-out embeddings of mean cosine
0.66 to the teacher's through such a projection, where the same shape from random
weights gives 0.40. At ``compression: 20`` its student is its last layer cut to 160
channels (5 heads): distilled on 1,500 sentences for 256 steps, 0.597 on held-out
sentences, where the 32-wide student from random weights that budget got before gave
0.351; on 21,339 sentences, 0.714 (the cut shape from random weights: 0.450). Of the
shapes that budget allows, the widest was best: two layers 128 wide gave 0.563, three
96 wide 0.549, and one 256 wide with its feed-forward layer and frequent-token rows
cut to make room 0.523 (256 steps each).

Only families whose layers keep BERT's, DistilBERT's or MPNet's parameter names, and whose
word embeddings are as wide as their layers (:data:`PRUNABLE_FAMILIES`), are cut. MPNet's
relative-position bias is one table for every layer, a column per head, so an MPNet
student keeps the same heads in every layer (those that weigh most over the kept
layers). DeBERTa-v2's relative-position embeddings live in the residual stream, which
each layer's own (cut) projections read, so they keep the kept channels. ALBERT, which
shares one layer across its depth and factorises its embeddings, gets a narrower student
from random weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from worker.engine.hf.bridges import set_ridge_solution
from worker.engine.hf.pooling import pool
from worker.engine.hf.wrapper import HFEncoder, row_batches

#: Families whose layers keep BERT's parameter names (``attention.self.query``,
#: ``attention.output.dense``, ``intermediate.dense``, ``output.dense``, ``LayerNorm``) or
#: DistilBERT's (``attention.q_lin``, ``attention.out_lin``, ``ffn.lin1``, ``ffn.lin2``,
#: ``sa_layer_norm``) or MPNet's (``attention.attn.q``, ``attention.attn.o``, the BERT names
#: for the rest); an ELECTRA's word embeddings must be as wide as its layers too
#: (:func:`~worker.engine.hf.sizing.cut_to_asked_width`).
PRUNABLE_FAMILIES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet", "deberta-v2"}
)
#: Families whose layers share a table with a column per head: every layer keeps the same.
SHARED_HEADS = frozenset({"mpnet"})
#: In a layer of each naming, (the attention's output projection, the feed-forward layer's
#: input and output): what the heads, the units and their weights are read from.
_BERT_PARTS = ("attention.output.dense", "intermediate.dense", "output.dense")
_PARTS = {
    "distilbert": ("attention.out_lin", "ffn.lin1", "ffn.lin2"),
    "mpnet": ("attention.attn.o", "intermediate.dense", "output.dense"),
}
#: Rows of the transfer set whose activations rank channels, heads and units, at most.
RANK_ROWS = 512
#: Rows a teacher pass of the ranking (and of the projection's fit) takes at once.
RANK_BATCH = 64
#: Ridge penalty on the projection's weights, as a share of the mean squared pooled state.
RIDGE = 1e-2

#: What each axis of a weight indexes, by the end of its name: the residual stream's
#: channels (``hidden``), the attention heads' dimensions (``heads``), the heads themselves
#: (``head_index``: MPNet's relative-position bias), the feed-forward units (``units``), or
#: something the student keeps whole (None). Order matters: the
#: attention's output projection is matched before the feed-forward one.
_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (
        r"attention\.(self\.(query|key|value|pos_key|pos_query)(_proj)?|(q|k|v)_lin|attn\.[qkv])\.weight$",
        ("heads", "hidden"),
    ),
    (
        r"attention\.(self\.(query|key|value|pos_key|pos_query)(_proj)?|(q|k|v)_lin|attn\.[qkv])\.bias$",
        ("heads",),
    ),
    (r"encoder\.rel_embeddings\.weight$", (None, "hidden")),
    (r"attention\.(output\.dense|out_lin|attn\.o)\.weight$", ("hidden", "heads")),
    (r"attention\.attn\.o\.bias$", ("hidden",)),
    (r"relative_attention_bias\.weight$", (None, "head_index")),
    (r"(intermediate\.dense|ffn\.lin1)\.weight$", ("units", "hidden")),
    (r"(intermediate\.dense|ffn\.lin1)\.bias$", ("units",)),
    (r"(output\.dense|ffn\.lin2)\.weight$", ("hidden", "units")),
    (r"(output\.dense|out_lin|ffn\.lin2|LayerNorm|layer_norm)\.(bias|weight)$", ("hidden",)),
    (r"pre_classifier\.weight$", ("hidden", "hidden")),
    (r"pre_classifier\.bias$", ("hidden",)),
    (r"embeddings\.\w+_embeddings\.weight$", (None, "hidden")),
    (r"pooler\.dense\.weight$", ("hidden", "hidden")),
    (r"pooler\.dense\.bias$", ("hidden",)),
    (r"classifier\.dense\.weight$", ("hidden", "hidden")),
    (r"classifier\.dense\.bias$", ("hidden",)),
    (r"classifier(\.out_proj)?\.weight$", (None, "hidden")),
    (r"classifier(\.out_proj)?\.bias$", (None,)),
)


@dataclass(frozen=True)
class Importance:
    """How much each part of the teacher carries (higher is more)."""

    #: (width,): each channel of the residual stream.
    channels: Tensor
    #: One (heads,) per teacher layer.
    heads: list[Tensor]
    #: One (units,) per teacher layer.
    units: list[Tensor]


def axes_of(key: str) -> tuple[str | None, ...] | None:
    """What each axis of the weight named ``key`` indexes; None for a buffer kept whole."""
    for pattern, axes in _AXES:
        if re.search(pattern, key):
            return axes
    return None


@torch.no_grad()
def rank_parts(teacher: HFEncoder, rows: dict[str, Tensor]) -> Importance:
    """The :class:`Importance` of the teacher's channels, heads and units on ``rows``.

    Without rows, the weights alone rank them: channels by their LayerNorm scales,
    heads by their output blocks and units by their output columns.
    """
    stack = teacher.get_submodule(teacher.layer_stack())
    assert isinstance(stack, nn.ModuleList)
    config = teacher.hf_config
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = width // heads
    attention_out, units_in, units_out = layer_parts(teacher.model_type)
    channels = torch.zeros(width, dtype=torch.float64)
    context = [torch.zeros(heads, dtype=torch.float64) for _ in stack]
    activity = [
        torch.zeros(_linear(layer, units_in).out_features, dtype=torch.float64) for layer in stack
    ]
    attended: list[Tensor] = []

    def on_context(index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        # What the attention's output projection takes in: each head's context vectors.
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            norms = args[0][attended[0]].reshape(-1, heads, head_dim).norm(dim=-1)
            context[index] += norms.double().sum(0).cpu()

        return hook

    def on_units(index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        # What the feed-forward output takes in: each unit's activation.
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            activity[index] += args[0][attended[0]].abs().double().sum(0).cpu()

        return hook

    handles = [
        hook
        for index, layer in enumerate(stack)
        for hook in (
            _linear(layer, attention_out).register_forward_pre_hook(on_context(index)),
            _linear(layer, units_out).register_forward_pre_hook(on_units(index)),
        )
    ]
    try:
        for inputs in row_batches(teacher, rows, RANK_ROWS, RANK_BATCH):
            attended[:] = [inputs["attention_mask"].ne(0)]
            states = teacher.model(**inputs, output_hidden_states=True).hidden_states
            for state in states:
                channels += state[attended[0]].double().pow(2).sum(0).cpu()
    finally:
        for handle in handles:
            handle.remove()
    if not bool(channels.any()):
        channels = sum(
            (
                module.weight.detach().double().pow(2).cpu()
                for module in teacher.modules()
                if isinstance(module, nn.LayerNorm) and module.weight.shape == (width,)
            ),
            torch.zeros(width, dtype=torch.float64),
        )
        context = [torch.ones(heads, dtype=torch.float64) for _ in stack]
        activity = [torch.ones_like(units) for units in activity]
    head_weights = [
        _linear(layer, attention_out)
        .weight.detach()
        .double()
        .cpu()
        .reshape(width, heads, head_dim)
        .norm(dim=(0, 2))
        for layer in stack
    ]
    unit_weights = [
        _linear(layer, units_out).weight.detach().double().cpu().norm(dim=0) for layer in stack
    ]
    return Importance(
        channels=channels,
        heads=[a * b for a, b in zip(context, head_weights, strict=True)],
        units=[a * b for a, b in zip(activity, unit_weights, strict=True)],
    )


def layer_parts(model_type: str) -> tuple[str, str, str]:
    """(the attention's output projection, the feed-forward input, its output) in a layer of
    ``model_type``."""
    return _PARTS.get(model_type, _BERT_PARTS)


def _linear(layer: nn.Module, name: str) -> nn.Linear:
    """The Linear ``name`` inside ``layer``."""
    module = layer.get_submodule(name)
    assert isinstance(module, nn.Linear)
    return module


def _top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest ``scores``, in their original order."""
    return scores.topk(keep).indices.sort().values


def kept_parts(
    importance: Importance,
    chosen: list[int],
    width: int,
    heads: int,
    units: int,
    head_dim: int,
    shared_heads: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(channels, each student layer's head dimensions, each one's units) the student keeps.

    With ``shared_heads`` (:data:`SHARED_HEADS`), every layer keeps the same heads: those
    that weigh most summed over the ``chosen`` layers.
    """
    scores = [importance.heads[index] for index in chosen]
    if shared_heads:
        scores = [torch.stack(scores).sum(0)] * len(chosen)
    dims = []
    for layer_scores in scores:
        kept_heads = _top(layer_scores, heads)
        dims.append((kept_heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1))
    return (
        _top(importance.channels, width),
        dims,
        [_top(importance.units[index], units) for index in chosen],
    )


def cut_state(
    own: dict[str, Tensor],
    source: dict[str, Tensor],
    key_in_teacher: dict[str, str],
    channels: Tensor,
    dims: list[Tensor],
    units: list[Tensor],
    layer_of: dict[str, int],
) -> dict[str, Tensor]:
    """The student's state: each teacher tensor cut to its kept channels, dims and units.

    ``key_in_teacher`` names each of ``own``'s keys in the teacher's ``source``;
    ``layer_of`` gives the student layer of a key inside the layer stack.
    """
    state = {}
    for key, mine in own.items():
        tensor = source[key_in_teacher[key]]
        axes = axes_of(key) if tensor.shape != mine.shape else None
        for axis, part in enumerate(axes or ()):
            if part is None or tensor.shape[axis] == mine.shape[axis]:
                continue
            if part == "hidden":
                index = channels
            elif part == "head_index":
                # Shared across layers, which keep the same heads: the first layer's, each
                # the first of its dims over the head size.
                head_dim = len(dims[0]) // mine.shape[axis]
                index = dims[0][::head_dim] // head_dim
            else:
                index = (dims if part == "heads" else units)[layer_of[key]]
            tensor = tensor.index_select(axis, index.to(tensor.device))
        if tensor.shape != mine.shape:
            theirs = source[key_in_teacher[key]]
            raise ValueError(
                f"cannot cut {key_in_teacher[key]} {tuple(theirs.shape)} to {key} "
                f"{tuple(mine.shape)}"
            )
        state[key] = tensor
    return state


@torch.no_grad()
def fit_projection(
    student: HFEncoder, teacher: HFEncoder, projection: nn.Linear, rows: dict[str, Tensor]
) -> int:
    """Fit ``projection`` (the student's pooled states to the teacher's embedding) by ridge.

    The target is the teacher's pooled embedding through its own Dense layers, before
    any normalisation, over the first :data:`RANK_ROWS` of ``rows``; the input is the
    student's pooled token states. Returns the rows fitted on (0: left as it was).
    """
    features = projection.in_features
    gram = torch.zeros(features + 1, features + 1, dtype=torch.float64)
    cross = torch.zeros(features + 1, projection.out_features, dtype=torch.float64)
    own_device = next(student.parameters()).device
    fitted = 0
    was_training = student.training
    student.eval()
    try:
        for inputs in row_batches(teacher, rows, RANK_ROWS, RANK_BATCH):
            source = _pooled(
                student, {name: value.to(own_device) for name, value in inputs.items()}
            )
            target = _pooled(teacher, inputs)
            for layer in teacher.dense:
                target = layer(target)
            source = torch.cat(
                [source.double().cpu(), torch.ones(len(source), 1, dtype=torch.float64)], 1
            )
            gram += source.T @ source
            cross += source.T @ target.double().cpu()
            fitted += len(source)
    finally:
        student.train(was_training)
    if fitted:
        set_ridge_solution(projection, gram, cross, RIDGE)
    return fitted


def _pooled(encoder: HFEncoder, inputs: dict[str, Tensor]) -> Tensor:
    """The encoder's pooled token states on model ``inputs``, before its Dense layers."""
    hidden = encoder.model(**inputs).last_hidden_state.float()
    return pool(hidden, inputs["attention_mask"], encoder.pooling)
