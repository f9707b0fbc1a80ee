"""The ``hf_encoder`` student: a smaller encoder of the teacher's family, seeded from its layers."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from worker.engine.errors import SpecInvalid, TeacherIncompatible
from worker.engine.hf.families import Head, make_config, make_model
from worker.engine.hf.sizing import choose_size, student_config
from worker.engine.hf.wrapper import HFEncoder
from worker.engine.spec import StudentSpec
from worker.engine.students import STUDENTS, StudentContext


def choose_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers that initialise the student: evenly spaced, first and last kept.

    6 of 12 gives DistilBERT's [0, 2, 4, 7, 9, 11]; 2 of 4 gives [0, 3].
    """
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [round(i * step) for i in range(student_layers)]


def _init_from_teacher(student: HFEncoder, teacher: HFEncoder, chosen: list[int]) -> None:
    """Copy embeddings, the chosen layers, pooler, head and Dense layers from the teacher."""
    stack = re.escape(student.layer_stack()) + r"\.(\d+)\."
    source = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        match = re.match(stack, key)
        if match and student.model_type != "albert":
            index = chosen[int(match.group(1))]
            key_in_teacher = key[: match.start(1)] + str(index) + key[match.end(1) :]
        else:
            key_in_teacher = key
        mapped[key] = source[key_in_teacher]
    student.load_state_dict(mapped, strict=True)


def _teacher_encoder(ctx: StudentContext) -> HFEncoder:
    module = getattr(ctx.teacher, "module", None)
    if not isinstance(module, HFEncoder):
        raise SpecInvalid(
            "the hf_encoder student needs a Hugging Face transformers teacher",
            field="student.architecture",
        )
    return module


@STUDENTS.register("hf_encoder")
def build_hf_encoder(spec: StudentSpec, ctx: StudentContext) -> HFEncoder:
    """A smaller encoder of the teacher's family, initialised from its layers.

    Depth (and width, if the budget needs it) follow :func:`choose_size`. With
    ``spec.init_from_teacher`` and the teacher's width, the student starts from
    the teacher's embeddings, evenly spaced layers (:func:`choose_layers`),
    pooler and head; a narrower student starts from scratch. Given
    ``ctx.saved_config`` (from ``rebuild_student``), rebuilds that student instead.
    """
    saved = getattr(ctx, "saved_config", None)
    if saved is not None:
        return rebuild_hf_encoder(saved)
    teacher = _teacher_encoder(ctx)
    tconfig = teacher.hf_config
    dense_params = sum(p.numel() for p in teacher.dense.parameters())
    layers, hidden, heads = choose_size(
        spec, tconfig, teacher.head, ctx.teacher_parameters or _params(teacher), dense_params
    )
    same_shape = hidden == tconfig.hidden_size and heads == tconfig.num_attention_heads
    init = spec.init_from_teacher and same_shape
    if init and layers > tconfig.num_hidden_layers and teacher.model_type != "albert":
        raise SpecInvalid(
            f"a student initialised from the teacher has at most its {tconfig.num_hidden_layers} "
            "layers; set init_from_teacher to false for a deeper student",
            field="student.num_layers",
        )
    config = student_config(tconfig, layers=layers, hidden=hidden, heads=heads)
    dense = _student_dense(teacher, hidden)
    student = _assemble(
        config=config,
        head=teacher.head,
        pooling=teacher.pooling,
        normalize=teacher.normalize,
        dense=dense,
        input_names=[n for n in teacher.input_names if n in ctx.input_names] or ["input_ids"],
        task=ctx.task,
        output_dim=ctx.output_dim,
    )
    if init:
        _init_from_teacher(student, teacher, choose_layers(tconfig.num_hidden_layers, layers))
    student.config["initialised_from_teacher_layers"] = (
        choose_layers(tconfig.num_hidden_layers, layers) if init else None
    )
    return student


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _student_dense(teacher: HFEncoder, hidden: int) -> list[dict[str, Any]]:
    """The teacher's Dense stack, its first input resized to a narrower student's pooled width."""
    dense = [dict(d) for d in teacher.dense_config]
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
) -> HFEncoder:
    # Embedding students pool token states here, so a bare model's pooler would never train.
    model = make_model(config, head, pooler=head != "base")
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
        "dense": [dict(d) for d in dense],
        "task": task,
        "modality": "text",
        "input_names": encoder.input_names,
        "output_dim": output_dim,
    }
    return encoder


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (dtypes, tuples) turned into plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
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
        hf_config = make_config(raw)
        encoder = _assemble(
            config=hf_config,
            head=head,
            pooling=list(config.get("pooling") or ["mean"]),
            normalize=bool(config.get("normalize", False)),
            dense=list(config.get("dense") or []),
            input_names=list(config["input_names"]),
            task=str(config["task"]),
            output_dim=int(config["output_dim"]),
        )
    except KeyError as exc:
        raise SpecInvalid(f"student_config lacks {exc}", field="student_config") from None
    encoder.config["initialised_from_teacher_layers"] = config.get(
        "initialised_from_teacher_layers"
    )
    return encoder
