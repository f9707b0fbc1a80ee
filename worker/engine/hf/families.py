"""The encoder families that may be loaded, and their built-in transformers classes.

The allowlist is the one gate on what runs: a class always comes from
transformers' own mappings for an allowlisted ``model_type``, never from a class
path the upload names (``auto_map``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from torch import nn

from worker.engine.errors import TeacherIncompatible, TeacherInvalid

#: Encoder families whose built-in transformers classes may be loaded, and where
#: each keeps its stack of layers (relative to the base model).
LAYER_STACKS: dict[str, str] = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "camembert": "encoder.layer",
    "electra": "encoder.layer",
    "deberta-v2": "encoder.layer",
    "mpnet": "encoder.layer",
    "distilbert": "transformer.layer",
    # ALBERT shares one layer group across its depth: a hook on it fires once per layer.
    "albert": "encoder.albert_layer_groups",
}
ALLOWED_MODEL_TYPES = frozenset(LAYER_STACKS)

#: What the model ends in: a sequence classifier's logits, or the bare encoder's token states.
Head = Literal["classification", "base"]


def config_class(model_type: str) -> Any:
    """The built-in config class of an allowlisted ``model_type``; refuses any other family."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in ALLOWED_MODEL_TYPES:
        allowed = ", ".join(sorted(ALLOWED_MODEL_TYPES))
        raise TeacherIncompatible(
            f"transformers model_type {model_type!r} is not supported; supported encoder "
            f"families: {allowed}",
            field="teacher",
        )
    return CONFIG_MAPPING[model_type]


def model_class(config: Any, head: Head) -> Any:
    """The built-in transformers class for ``config``: never a class named by ``auto_map``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        MODEL_MAPPING,
    )

    mapping = (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if head == "classification" else MODEL_MAPPING
    )
    return mapping[type(config)]


def make_config(raw: dict[str, Any]) -> Any:
    """A built-in config object from a config.json dict (``auto_map`` dropped, never followed)."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise TeacherInvalid("config.json has no model_type", field="teacher")
    clean = {key: value for key, value in raw.items() if key != "auto_map"}
    try:
        return config_class(model_type).from_dict(clean)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise TeacherInvalid(f"config.json does not describe a {model_type} model: {exc}") from None


def make_model(config: Any, head: Head, *, pooler: bool = True) -> nn.Module:
    """A freshly initialised built-in model; ``pooler=False`` leaves out an unused pooler."""
    built_in = model_class(config, head)
    kwargs = {}
    if not pooler and "add_pooling_layer" in inspect.signature(built_in.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    model: nn.Module = built_in(config, **kwargs)
    return model
