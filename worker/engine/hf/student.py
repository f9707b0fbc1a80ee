"""The ``hf_encoder`` student: a smaller encoder of the teacher's family, seeded from its layers."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from worker.engine.errors import SpecInvalid, TeacherIncompatible
from worker.engine.hf.bridges import bridged_layers, fit_bridges, insert_bridges
from worker.engine.hf.embeddings import FactorisedEmbedding, VocabularyCut
from worker.engine.hf.families import Head, make_config, make_model
from worker.engine.hf.pruning import (
    SHARED_HEADS,
    cut_state,
    fit_projection,
    kept_parts,
    rank_parts,
)
from worker.engine.hf.sizing import (
    choose_cut_depth,
    choose_factorised_size,
    choose_layers,
    choose_pruned_size,
    choose_size,
    cut_to_asked_width,
    intermediate_size,
    student_config,
)
from worker.engine.hf.wrapper import HFEncoder
from worker.engine.spec import StudentSpec
from worker.engine.students import STUDENTS, StudentContext


def _init_from_teacher(
    student: HFEncoder, teacher: HFEncoder, chosen: list[int], token_counts: Any = None
) -> None:
    """Copy embeddings, the chosen layers, pooler, head and Dense layers from the teacher.

    Factorised or cut word embeddings start from the teacher's table instead
    (:meth:`FactorisedEmbedding.initialise`, :meth:`VocabularyCut.initialise`, each
    led by ``token_counts``).
    """
    source = teacher.state_dict()
    factorised = _factorised_embedding(student)
    own = student.state_dict()
    key_in_teacher, layer_of = _teacher_keys(student, chosen)
    # Factorised or cut word embeddings keep their fresh weights until initialised below.
    mapped = dict(own)
    pruned: dict[int | None, list[str]] = {}
    for key, teacher_key in key_in_teacher.items():
        mapped[key] = source[teacher_key]
        if mapped[key].shape != own[key].shape:
            pruned.setdefault(layer_of.get(key), []).append(key)
    for keys in pruned.values():
        mapped.update(_prune_feed_forward({key: mapped[key] for key in keys}, own))
    student.load_state_dict(mapped, strict=True)
    if factorised is not None:
        table = input_embeddings(teacher.model).get_parameter("weight")
        factorised.initialise(
            table, None if token_counts is None else torch.as_tensor(token_counts)
        )


def _teacher_keys(
    student: HFEncoder, chosen: list[int], skipped: tuple[str, ...] = ()
) -> tuple[dict[str, str], dict[str, int]]:
    """(each state key of ``student`` named in the teacher's state, the student layer of each
    key in the layer stack), factorised or cut word embeddings (initialised from the
    teacher's table instead) and keys under the ``skipped`` prefixes left out.

    Student layer ``i`` is teacher layer ``chosen[i]``; ALBERT's shared layer groups keep
    their own names.
    """
    factorised = _factorised_embedding(student)
    if factorised is not None:
        skipped = (*skipped, _module_name(student, factorised) + ".")
    stack = re.escape(student.layer_stack()) + r"\.(\d+)\."
    key_in_teacher: dict[str, str] = {}
    layer_of: dict[str, int] = {}
    for key in student.state_dict():
        if skipped and key.startswith(skipped):
            continue
        key_in_teacher[key] = key
        match = re.match(stack, key)
        if match:
            layer_of[key] = int(match.group(1))
            if student.model_type != "albert":
                index = str(chosen[layer_of[key]])
                key_in_teacher[key] = key[: match.start(1)] + index + key[match.end(1) :]
    return key_in_teacher, layer_of


def _prune_feed_forward(
    tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One teacher layer's feed-forward ``tensors`` cut to the student's (``own``) shapes.

    The units kept are those whose input row and output column weigh most together (the
    product of their norms), in the teacher's order; each tensor loses the others along
    the one axis its student shape is shorter on.
    """
    axes = {}
    for key, tensor in tensors.items():
        shapes = zip(tensor.shape, own[key].shape, strict=True)
        (axes[key],) = [axis for axis, (theirs, mine) in enumerate(shapes) if theirs != mine]
    importance = None
    for key, tensor in tensors.items():
        if tensor.dim() == 2:
            other = 1 - axes[key]
            norms = tensor.float().norm(dim=other)
            importance = norms if importance is None else importance * norms
    if importance is None:
        raise ValueError(f"no weight among {sorted(tensors)} to rank feed-forward units by")
    first = next(iter(tensors))
    keep = int(own[first].shape[axes[first]])
    units = importance.topk(keep).indices.sort().values
    return {key: tensor.index_select(axes[key], units) for key, tensor in tensors.items()}


def _factorised_embedding(encoder: HFEncoder) -> FactorisedEmbedding | VocabularyCut | None:
    """The encoder's word embeddings when they are factorised or cut, else None."""
    embeddings = input_embeddings(encoder.model)
    return embeddings if isinstance(embeddings, (FactorisedEmbedding, VocabularyCut)) else None


def input_embeddings(model: nn.Module) -> nn.Module:
    """The word embeddings of a transformers model."""
    embeddings: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    return embeddings


def _module_name(root: nn.Module, module: nn.Module) -> str:
    """Dotted name of ``module`` within ``root``."""
    return next(name for name, candidate in root.named_modules() if candidate is module)


def _teacher_encoder(context: StudentContext) -> HFEncoder:
    """The teacher's :class:`HFEncoder`; any other teacher cannot seed this student."""
    module = getattr(context.teacher, "module", None)
    if not isinstance(module, HFEncoder):
        raise SpecInvalid(
            "the hf_encoder student needs a Hugging Face transformers teacher",
            field="student.architecture",
        )
    return module


@STUDENTS.register("hf_encoder")
def build_hf_encoder(spec: StudentSpec, context: StudentContext) -> HFEncoder:
    """A smaller encoder of the teacher's family, initialised from its layers.

    Depth (and width, if the budget needs it) follow :func:`choose_size`. With
    ``spec.init_from_teacher`` and the teacher's width, the student starts from
    the teacher's embeddings, evenly spaced layers (:func:`choose_layers`),
    pooler and head. Where the budget would need a narrower student, one that
    keeps the teacher's width with factorised word embeddings
    (:func:`~worker.engine.hf.sizing.choose_factorised_size`) is preferred: it
    starts from the teacher's layers (first and last of two, the last of one; where the
    budget needs it, their feed-forward layers keep only their most important units, see
    :func:`_prune_feed_forward`) and from an SVD of its embedding table weighted
    by ``context.token_counts``, which a narrower student, starting from scratch,
    cannot. A kept layer whose teacher layer does not follow the previous one's (for the
    first, the embeddings) takes its input through a bridge fitted on
    ``context.sample_inputs`` (:mod:`~worker.engine.hf.bridges`). Given ``context.saved_config``
    (from ``rebuild_student``), rebuilds that student instead.
    """
    saved = getattr(context, "saved_config", None)
    if saved is not None:
        return rebuild_hf_encoder(saved)
    teacher = _teacher_encoder(context)
    teacher_config = teacher.hf_config
    teacher_layers = teacher_config.num_hidden_layers
    teacher_shape = (teacher_config.hidden_size, teacher_config.num_attention_heads)
    embedding: dict[str, Any] | None
    feed_forward: int | None = None
    if spec.vocabulary == "transfer":
        layers, embedding = _cut_design(spec, context, teacher)
        hidden, heads = teacher_shape
    else:
        layers, hidden, heads, embedding = _sized_design(spec, context, teacher)
        if embedding is not None:
            feed_forward = embedding.pop("feed_forward", None)
    same_width = hidden == teacher_config.hidden_size
    same_shape = same_width and heads == teacher_config.num_attention_heads
    # A narrower student is cut from the teacher where _pruned_design chose it, or where the
    # spec asks for a width of whole teacher heads.
    cut = not same_shape and (
        embedding is not None or cut_to_asked_width(spec, teacher_config, hidden, heads)
    )
    from_teacher = spec.init_from_teacher and (same_shape or cut)
    if from_teacher and layers > teacher_layers and teacher.model_type != "albert":
        raise SpecInvalid(
            f"a student initialised from the teacher has at most its {teacher_layers} "
            "layers; set init_from_teacher to false for a deeper student",
            field="student.num_layers",
        )
    input_names = [name for name in teacher.input_names if name in context.input_names]
    student = _assemble(
        config=student_config(
            teacher_config,
            layers=layers,
            hidden=hidden,
            heads=heads,
            feed_forward=feed_forward,
            dropout=spec.dropout,
        ),
        head=teacher.head,
        pooling=teacher.pooling,
        normalize=teacher.normalize,
        dense=_student_dense(teacher, hidden),
        input_names=input_names or ["input_ids"],
        task=context.task,
        output_dim=context.output_dim,
        word_embeddings=embedding,
    )
    chosen = choose_layers(teacher_layers, layers) if from_teacher else None
    rows = {
        name: torch.as_tensor(value)
        for name, value in (getattr(context, "sample_inputs", None) or {}).items()
    }
    channels = None
    if chosen is not None and cut:
        channels = _cut_from_teacher(
            student, teacher, chosen, rows, getattr(context, "token_counts", None)
        )
    elif chosen is not None:
        _init_from_teacher(student, teacher, chosen, getattr(context, "token_counts", None))
    student.config["initialised_from_teacher_layers"] = chosen
    if chosen is not None and student.model_type != "albert":
        _add_bridges(student, bridged_layers(chosen))
        fit_bridges(_layer_stack(student), chosen, teacher, rows, channels=channels)
    if channels is not None and student.dense and not teacher.dense:
        projection = student.get_submodule("dense.0.0")
        assert isinstance(projection, nn.Linear)
        fit_projection(student, teacher, projection, rows)
    return student


def _cut_from_teacher(
    student: HFEncoder,
    teacher: HFEncoder,
    chosen: list[int],
    rows: dict[str, torch.Tensor],
    token_counts: Any = None,
) -> torch.Tensor:
    """Seed a narrower ``student`` with the teacher's most important parts; returns the
    residual-stream channels it kept (:mod:`~worker.engine.hf.pruning`).

    Its layers are cut from teacher layers ``chosen``, its embeddings (word embeddings
    factorised from the teacher's table cut to those channels), pooler and head from the
    teacher's; the teacher's Dense layers take the kept channels of each pooled block. A
    projection to the teacher's embedding width is left to :func:`fit_projection`.
    """
    config = student.hf_config
    importance = rank_parts(teacher, rows)
    teacher_config = teacher.hf_config
    head_dim = int(teacher_config.hidden_size) // int(teacher_config.num_attention_heads)
    channels, dims, units = kept_parts(
        importance,
        chosen,
        int(config.hidden_size),
        int(config.num_attention_heads),
        intermediate_size(config),
        head_dim,
        shared_heads=teacher.model_type in SHARED_HEADS,
    )
    factorised = _factorised_embedding(student)
    own = student.state_dict()
    key_in_teacher, layer_of = _teacher_keys(student, chosen, skipped=("dense.",))
    source = teacher.state_dict()
    state = dict(own)
    state.update(
        cut_state(
            {key: own[key] for key in key_in_teacher},
            source,
            key_in_teacher,
            channels,
            dims,
            units,
            layer_of,
        )
    )
    if teacher.dense:
        width = int(teacher_config.hidden_size)
        blocks = torch.cat([channels + block * width for block in range(len(teacher.pooling))])
        for key in own:
            if key.startswith("dense."):
                state[key] = source[key]
        state["dense.0.0.weight"] = source["dense.0.0.weight"].index_select(1, blocks)
    student.load_state_dict(state, strict=True)
    if factorised is not None:
        table = input_embeddings(teacher.model).get_parameter("weight").detach()
        factorised.initialise(
            table.index_select(1, channels.to(table.device)),
            None if token_counts is None else torch.as_tensor(token_counts),
        )
    return channels


def _layer_stack(encoder: HFEncoder) -> nn.ModuleList:
    stack = encoder.get_submodule(encoder.layer_stack())
    assert isinstance(stack, nn.ModuleList)
    return stack


def _add_bridges(encoder: HFEncoder, indices: list[int]) -> None:
    """Put :class:`~worker.engine.hf.bridges.LayerBridge`\\ s before the layers at ``indices``."""
    insert_bridges(_layer_stack(encoder), indices, encoder.hidden_size)
    encoder.config["bridges"] = list(indices)


def _sized_design(
    spec: StudentSpec, context: StudentContext, teacher: HFEncoder
) -> tuple[int, int, int, dict[str, Any] | None]:
    """(layers, hidden, heads, word embeddings) under the budget, the teacher's vocabulary kept.

    :func:`choose_size` first; where it would narrow the student (or finds nothing that
    fits), a teacher-width student with factorised word embeddings is preferred, and where
    none fits, a narrower one cut from the teacher's layers (:func:`choose_pruned_size`)
    with factorised word embeddings too, before one from random weights.
    """
    teacher_config = teacher.hf_config
    teacher_shape = (teacher_config.hidden_size, teacher_config.num_attention_heads)
    try:
        layers, hidden, heads = choose_size(
            spec,
            teacher_config,
            teacher.head,
            *_sizes(context, teacher),
            lambda width: dense_parameters(teacher, width),
        )
        narrowed: SpecInvalid | None = None
    except SpecInvalid as error:
        narrowed, (layers, hidden, heads) = error, (0, 0, 0)
    # Narrower than the teacher: keep its width and factorise the word embeddings instead.
    embedding: dict[str, Any] | None = (
        _factorised_design(spec, context, teacher) if (hidden, heads) != teacher_shape else None
    )
    if embedding is not None:
        layers, (hidden, heads) = embedding.pop("layers"), teacher_shape
    elif (hidden, heads) != teacher_shape and (pruned := _pruned_design(spec, context, teacher)):
        layers, hidden, heads = pruned.layers, pruned.hidden, pruned.heads
        embedding = {"rank": pruned.rank, "frequent_tokens": pruned.frequent_tokens}
    elif narrowed is not None:
        raise narrowed
    return layers, hidden, heads, embedding


def _pruned_design(spec: StudentSpec, context: StudentContext, teacher: HFEncoder) -> Any:
    """The :class:`~worker.engine.hf.sizing.PrunedSize` of a narrower student cut from the
    teacher, or None (see :func:`choose_pruned_size`)."""
    if not _plain_word_embeddings(teacher):
        return None
    return choose_pruned_size(
        spec,
        teacher.hf_config,
        teacher.head,
        _sizes(context, teacher)[0],
        lambda width: dense_parameters(teacher, width),
        _used_tokens(context),
    )


def _plain_word_embeddings(teacher: HFEncoder) -> bool:
    """Whether the teacher's word embeddings are one row per token as wide as its layers
    (ALBERT and small ELECTRAs already factorise theirs), so a student can factorise them."""
    config = teacher.hf_config
    table = input_embeddings(teacher.model)
    return isinstance(table, nn.Embedding) and table.weight.shape == (
        config.vocab_size,
        config.hidden_size,
    )


def dense_parameters(teacher: HFEncoder, width: int) -> int:
    """Parameters of the Dense layers (or the projection to the teacher's embedding width)
    of a student ``width`` wide."""
    return sum(
        (layer["in_features"] + int(layer.get("bias", True))) * layer["out_features"]
        for layer in _student_dense(teacher, width)
    )


def _cut_design(
    spec: StudentSpec, context: StudentContext, teacher: HFEncoder
) -> tuple[int, dict[str, Any]]:
    """(layers, word embeddings) of a teacher-width student with its vocabulary cut.

    ``student.vocabulary: "transfer"``: one row for each token the transfer set uses.
    The rows are the teacher's, so the student keeps the teacher's width and heads
    and starts from its layers.
    """
    config = teacher.hf_config
    table = input_embeddings(teacher.model)
    if not (isinstance(table, nn.Embedding) and table.weight.shape[0] == config.vocab_size):
        raise SpecInvalid(
            f"the {config.model_type} teacher's word embeddings cannot be cut to the "
            'transfer set\'s tokens; leave student.vocabulary at "teacher"',
            field="student.vocabulary",
        )
    if spec.hidden_size not in (None, config.hidden_size) or spec.num_heads not in (
        None,
        config.num_attention_heads,
    ):
        raise SpecInvalid(
            "a student with the transfer set's vocabulary keeps the teacher's rows, so its "
            f"width and heads are the teacher's ({config.hidden_size}, "
            f"{config.num_attention_heads})",
            field="student.vocabulary",
        )
    if not spec.init_from_teacher:
        raise SpecInvalid(
            "a student with the transfer set's vocabulary starts from the teacher's rows; "
            "set init_from_teacher to true",
            field="student.vocabulary",
        )
    used = _used_tokens(context)
    if used == 0:
        raise SpecInvalid("the transfer set has no tokens to keep", field="student.vocabulary")
    layers = choose_cut_depth(spec, config, teacher.head, *_sizes(context, teacher), used)
    return layers, {"kind": "cut", "kept_tokens": used}


def _used_tokens(context: StudentContext) -> int:
    """How many distinct token ids the transfer set's training rows use (0 if unknown)."""
    counts = getattr(context, "token_counts", None)
    return int((torch.as_tensor(counts) > 0).sum()) if counts is not None else 0


def _sizes(context: StudentContext, teacher: HFEncoder) -> tuple[int, int]:
    """(the teacher's parameters, those of its Dense layers): what a budget is measured on."""
    return (
        context.teacher_parameters or _parameter_count(teacher),
        _parameter_count(teacher.dense),
    )


def _factorised_design(
    spec: StudentSpec, context: StudentContext, teacher: HFEncoder
) -> dict[str, int | None] | None:
    """``layers``, ``rank``, ``frequent_tokens`` and ``feed_forward`` (None: the teacher's)
    of a teacher-width student, or None.

    Only for a student initialised from the teacher whose width and heads the
    spec leaves open, and a teacher whose word embeddings are as wide as its
    layers (ALBERT and small ELECTRAs already factorise theirs).
    """
    config = teacher.hf_config
    if not (
        spec.init_from_teacher
        and spec.hidden_size in (None, config.hidden_size)
        and spec.num_heads in (None, config.num_attention_heads)
        and _plain_word_embeddings(teacher)
    ):
        return None
    size = choose_factorised_size(
        spec, config, teacher.head, *_sizes(context, teacher), _used_tokens(context)
    )
    if size is None:
        return None
    return {
        "layers": size.layers,
        "rank": size.rank,
        "frequent_tokens": size.frequent_tokens,
        # The teacher's feed-forward width is left to its config; a pruned one is set.
        "feed_forward": (
            None if size.feed_forward == intermediate_size(config) else size.feed_forward
        ),
    }


def _parameter_count(module: nn.Module) -> int:
    """Parameters of ``module``, all of them."""
    return sum(parameter.numel() for parameter in module.parameters())


def _student_dense(teacher: HFEncoder, hidden: int) -> list[dict[str, Any]]:
    """The teacher's Dense stack, its first input resized to a narrower student's pooled width."""
    dense = [dict(layer) for layer in teacher.dense_config]
    if dense:
        dense[0]["in_features"] = hidden * len(teacher.pooling)
    elif teacher.head == "base" and hidden != teacher.hidden_size:
        # A narrower student still outputs the teacher's embedding width.
        dense = [
            {
                "in_features": hidden * len(teacher.pooling),
                "out_features": teacher.output_dim,
                "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            }
        ]
    return dense


def _assemble(
    *,
    config: Any,
    head: Head,
    pooling: list[str],
    normalize: bool,
    dense: list[dict[str, Any]],
    input_names: list[str],
    task: str,
    output_dim: int,
    word_embeddings: dict[str, Any] | None = None,
) -> HFEncoder:
    """A fresh student of this shape, with the ``config`` that rebuilds it.

    ``word_embeddings`` replaces the model's word embeddings: ``rank`` and
    ``frequent_tokens`` by a :class:`FactorisedEmbedding` of that shape, ``kind:
    "cut"`` and ``kept_tokens`` by a :class:`VocabularyCut`.
    """
    # Embedding students pool token states here, so a bare model's pooler would never train.
    model = make_model(config, head, pooler=head != "base")
    if word_embeddings is not None:
        model.set_input_embeddings(  # type: ignore[operator]  # transformers' PreTrainedModel
            _reduced_embeddings(config, word_embeddings)
        )
    encoder = HFEncoder(
        model,
        model_type=config.model_type,
        head=head,
        pooling=pooling,
        normalize=normalize,
        dense=dense,
        input_names=input_names,
    )
    if encoder.output_dim != output_dim:
        raise TeacherIncompatible(
            f"the hf_encoder student outputs {encoder.output_dim} values but the teacher "
            f"outputs {output_dim}",
            field="student.architecture",
        )
    encoder.config = {
        "architecture": "hf_encoder",
        "hf_config": _jsonable(config.to_dict()),
        "model_type": config.model_type,
        "head": head,
        "pooling": list(pooling),
        "normalize": normalize,
        "dense": [dict(layer) for layer in dense],
        "task": task,
        "modality": "text",
        "input_names": encoder.input_names,
        "output_dim": output_dim,
        "word_embeddings": dict(word_embeddings) if word_embeddings is not None else None,
    }
    return encoder


def _reduced_embeddings(
    config: Any, word_embeddings: dict[str, Any]
) -> FactorisedEmbedding | VocabularyCut:
    """The word embeddings ``word_embeddings`` describes, fresh."""
    if word_embeddings.get("kind", "factorised") == "cut":
        return VocabularyCut(
            int(config.vocab_size), int(config.hidden_size), int(word_embeddings["kept_tokens"])
        )
    return FactorisedEmbedding(
        int(config.vocab_size),
        int(word_embeddings["rank"]),
        int(config.hidden_size),
        int(word_embeddings["frequent_tokens"]),
    )


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (dtypes, tuples) turned into plain values."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def rebuild_hf_encoder(config: dict[str, Any]) -> HFEncoder:
    """The student architecture from its ``config`` (student_config.json), weights fresh.

    Built from the config alone (no download, no teacher); ``model_type`` must
    be on the allowlist and the class comes from transformers' own mapping.
    """
    try:
        raw = dict(config["hf_config"])
        head: Head = config["head"]
        if head not in ("classification", "base"):
            raise SpecInvalid(f"unknown hf_encoder head {head!r}", field="student_config.head")
        encoder = _assemble(
            config=make_config(raw),
            head=head,
            pooling=list(config.get("pooling") or ["mean"]),
            normalize=bool(config.get("normalize", False)),
            dense=list(config.get("dense") or []),
            input_names=list(config["input_names"]),
            task=str(config["task"]),
            output_dim=int(config["output_dim"]),
            word_embeddings=config.get("word_embeddings"),
        )
    except KeyError as exc:
        raise SpecInvalid(f"student_config lacks {exc}", field="student_config") from None
    encoder.config["initialised_from_teacher_layers"] = config.get(
        "initialised_from_teacher_layers"
    )
    if config.get("bridges"):
        _add_bridges(encoder, [int(index) for index in config["bridges"]])
    return encoder
