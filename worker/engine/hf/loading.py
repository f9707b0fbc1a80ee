"""A transformers or sentence-transformers folder read into a frozen HFEncoder and tokenizer.

Loading never runs code from the upload: the model class comes from
transformers' own mappings for an allowlisted ``model_type`` (see
:mod:`worker.engine.hf.families`), weights are read from safetensors only, and
the sentence-transformers modules (pooling, dense, normalize) are rebuilt from
their JSON configs rather than imported by the class path they name.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from worker.engine.archive import contained
from worker.engine.errors import (
    ArchiveUnsafe,
    TeacherIncompatible,
    TeacherInvalid,
)
from worker.engine.hf.families import Head, make_config, model_class
from worker.engine.hf.pooling import POOLING_MODES
from worker.engine.hf.tokenizer import load_tokenizer
from worker.engine.hf.wrapper import HFEncoder
from worker.engine.inspection import refuse_per_token_heads, require_safetensors

#: Families whose position ids start after the padding index (RoBERTa-style).
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet"})
#: Pooling flags of older sentence-transformers configs, and the mode each turns on.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: sentence-transformers modules rebuilt here from their configs (never imported).
_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")

#: What the teacher's output is, as the engine's job spec names it.
Task = Literal["classification", "regression", "embedding"]


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; anything else makes the teacher invalid."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherInvalid(f"cannot read {path.name}: {exc}", field="teacher") from None
    if not isinstance(data, dict):
        raise TeacherInvalid(f"{path.name} is not a JSON object", field="teacher")
    return data


def _require_safetensors(folder: Path, what: str) -> None:
    """Refuse ``folder`` unless its weights are in safetensors, saying how to convert pickles."""
    require_safetensors([file.name for file in folder.iterdir() if file.is_file()], what)


#: JSON files whose ``*_file`` entries name files transformers opens.
_FILE_NAMING_CONFIGS = ("config.json", "tokenizer_config.json")


def _bundle_file(root: Path, folder: Path, entry: Any, named_by: str) -> Path:
    """The file ``entry`` (relative to ``folder``) names, refused unless it lies in ``root``.

    Checked by name alone, so the error is the same whether an outside path exists or not.
    """
    if not isinstance(entry, str) or not entry or Path(entry).is_absolute() or "\\" in entry:
        raise ArchiveUnsafe(f"{named_by} names {entry!r}, not a path inside the bundle")
    try:
        target = contained(root, str((folder / entry).relative_to(root)))
    except (ArchiveUnsafe, ValueError):
        raise ArchiveUnsafe(f"{named_by} names {entry!r}, outside the bundle") from None
    if not target.is_file():
        raise TeacherInvalid(f"{named_by} names {entry!r}, which the bundle lacks", field="teacher")
    return target


def check_bundle_references(root: Path, model_dir: Path) -> None:
    """Every file the weight index and the configs name stays inside the bundle ``root``.

    Run before transformers sees the folder: it joins absolute names as given.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise TeacherInvalid(f"{index.name} has no weight_map", field="teacher")
        for entry in set(map(str, weight_map.values())):
            if not entry.endswith(".safetensors"):
                raise TeacherInvalid(
                    f"{index.name} names {entry!r}, not a safetensors file", field="teacher"
                )
            _bundle_file(root, model_dir, entry, index.name)
    for name in _FILE_NAMING_CONFIGS:
        if not (model_dir / name).is_file():
            continue
        for key, value in _read_json(model_dir / name).items():
            if key.endswith("_file") and value is not None:
                _bundle_file(root, model_dir, value, f"{name} ({key})")


def _head_and_task(config: Any) -> tuple[Head, Task]:
    """The head to load and the task it serves, read from ``config.architectures``."""
    architectures = list(getattr(config, "architectures", None) or [])
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        # Multi-label logits are independent sigmoids: matched as values, not as a softmax.
        if config.num_labels == 1 or config.problem_type in (
            "regression",
            "multi_label_classification",
        ):
            return "classification", "regression"
        return "classification", "classification"
    refuse_per_token_heads(architectures)
    # Bare encoders and pre-training checkpoints (MaskedLM, PreTraining) serve embeddings.
    return "base", "embedding"


def _load_pretrained(config: Any, folder: Path, head: Head) -> nn.Module:
    """The built-in model with its safetensors weights; refuses a checkpoint that leaves gaps."""
    try:
        loaded, loading_info = model_class(config, head).from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
            dtype=torch.float32,
        )
    except Exception as exc:
        # Malformed uploads fail in many ways (safetensors header, shapes, I/O): all are invalid.
        raise TeacherInvalid(
            f"cannot load the transformers weights: {type(exc).__name__}: {exc}", field="teacher"
        ) from None
    missing = sorted(loading_info.get("missing_keys") or [])
    if head == "base":
        # Bare encoders are pooled here, not through the pooler an MLM checkpoint may lack.
        missing = [key for key in missing if not key.startswith("pooler.")]
    mismatched = sorted(loading_info.get("mismatched_keys") or [])
    if missing or mismatched:
        shown = ", ".join(str(key) for key in (missing + mismatched)[:5])
        raise TeacherInvalid(
            f"the weights do not match config.json (missing or mis-shaped: {shown})",
            field="teacher",
        )
    model: nn.Module = loaded
    return model


def _sentence_transformers_modules(root: Path) -> list[dict[str, Any]]:
    """modules.json entries (empty without one), each with its ``kind``.

    Only the plain pipeline is understood: Transformer, Pooling, any Dense
    layers, then an optional Normalize. Class paths are matched by name and
    never imported.
    """
    if not (root / "modules.json").is_file():
        return []
    try:
        raw: Any = json.loads((root / "modules.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherInvalid(f"cannot read modules.json: {exc}", field="teacher") from None
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        raise TeacherInvalid("modules.json is not a list of modules", field="teacher")
    modules = []
    for entry in sorted(raw, key=lambda entry: int(entry.get("idx", 0))):
        class_path = str(entry.get("type", ""))
        kind = class_path.rsplit(".", 1)[-1]
        if not class_path.startswith("sentence_transformers.") or kind not in _MODULE_KINDS:
            raise TeacherIncompatible(
                f"sentence-transformers module {class_path!r} is not supported; supported: "
                f"{', '.join(_MODULE_KINDS)}",
                field="teacher",
            )
        modules.append({**entry, "kind": kind})
    kinds = "".join(module["kind"][0] for module in modules)
    if not re.fullmatch(r"TPD*N?", kinds):
        raise TeacherIncompatible(
            "sentence-transformers modules must be Transformer, Pooling, any Dense layers and "
            f"an optional Normalize, in that order; found {[module['kind'] for module in modules]}",
            field="teacher",
        )
    return modules


def _folder_options(root: Path, modules: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the model lies and how its token states become the output.

    A plain transformers folder (no ``modules``) is mean-pooled. A
    sentence-transformers folder names its pooling modes, Dense layers (configs
    and folders), normalisation and text options.
    """
    options: dict[str, Any] = {
        "model_dir": root,
        "pooling": ["mean"],
        "dense": [],
        "dense_dirs": [],
        "normalize": False,
        "max_length": None,
        "lowercase": False,
    }
    if not modules:
        return options
    options["model_dir"] = contained(root, modules[0].get("path") or "")
    options.update(_text_options(options["model_dir"]))
    for module in modules[1:]:
        folder = contained(root, module.get("path") or "")
        config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise TeacherIncompatible(
                f"sentence-transformers {module['kind']} on {config['module_input_name']!r} "
                "is not supported (only on the sentence embedding)",
                field="teacher",
            )
        if module["kind"] == "Pooling":
            options["pooling"] = _pooling_modes(config)
        elif module["kind"] == "Dense":
            options["dense"].append(_dense_layer(config))
            options["dense_dirs"].append(folder)
        elif module["kind"] == "Normalize":
            options["normalize"] = True
    return options


def _text_options(model_dir: Path) -> dict[str, Any]:
    """``max_length`` and ``lowercase`` from sentence_bert_config.json, where there is one."""
    if not (model_dir / "sentence_bert_config.json").is_file():
        return {}
    sentence_config = _read_json(model_dir / "sentence_bert_config.json")
    task = sentence_config.get("transformer_task", "feature-extraction")
    text = (sentence_config.get("modality_config") or {}).get("text") or {}
    if task != "feature-extraction" or text.get("method", "forward") != "forward":
        raise TeacherIncompatible(
            f"sentence-transformers transformer task {task!r} is not supported",
            field="teacher",
        )
    return {
        "max_length": sentence_config.get("max_seq_length"),
        "lowercase": bool(sentence_config.get("do_lower_case", False)),
    }


def _dense_layer(config: dict[str, Any]) -> dict[str, Any]:
    """A Dense module's sizes, bias and activation (sentence-transformers' Tanh by default)."""
    return {
        "in_features": int(config["in_features"]),
        "out_features": int(config["out_features"]),
        "bias": bool(config.get("bias", True)),
        "activation_function": config.get(
            "activation_function", "torch.nn.modules.activation.Tanh"
        ),
    }


def _pooling_modes(config: dict[str, Any]) -> list[str]:
    """The modes a Pooling config turns on, in the order sentence-transformers concatenates."""
    named = config.get("pooling_mode")
    if named is None:
        flagged = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        modes = flagged or ["mean"]
    else:
        modes = [named] if isinstance(named, str) else list(named)
    unknown = [mode for mode in modes if mode not in POOLING_MODES]
    if unknown:
        raise TeacherIncompatible(f"unknown pooling mode {unknown[0]!r}", field="teacher")
    return [mode for mode in POOLING_MODES if mode in modes]


def _load_dense(folder: Path, module: nn.Sequential) -> None:
    """A sentence-transformers Dense layer's safetensors weights, into ``module``'s Linear."""
    from safetensors.torch import load_file

    _require_safetensors(folder, f"sentence-transformers module {folder.name}")
    try:
        state = load_file(str(folder / "model.safetensors"))
        module[0].load_state_dict(
            {
                key.removeprefix("linear."): tensor.float()
                for key, tensor in state.items()
                if key.startswith("linear.")
            }
        )
    except Exception as exc:
        raise TeacherInvalid(f"{folder.name} weights do not match its config: {exc}") from None


def load_folder(root: Path) -> tuple[HFEncoder, Any, Task, dict[str, Any]]:
    """Build the frozen :class:`HFEncoder` and tokenizer from an extracted transformers folder.

    Returns ``(module, tokenizer, task, extra)``; ``extra`` describes pooling,
    normalisation and sizes for the signature.
    """
    modules = _sentence_transformers_modules(root)
    options = _folder_options(root, modules)
    model_dir = options["model_dir"]
    if not (model_dir / "config.json").is_file():
        raise TeacherInvalid("the bundle has no config.json", field="teacher")
    check_bundle_references(root, model_dir)
    config = make_config(_read_json(model_dir / "config.json"))
    _require_safetensors(model_dir, "the transformers model")
    head: Head
    task: Task
    if modules:
        head, task = "base", "embedding"
    else:
        head, task = _head_and_task(config)
    tokenizer = load_tokenizer(model_dir, root, lowercase=options["lowercase"])
    max_length = _max_length(config, tokenizer, options["max_length"])
    tokenizer.model_max_length = max_length
    model = _load_pretrained(config, model_dir, head)
    module = HFEncoder(
        model,
        model_type=config.model_type,
        head=head,
        pooling=options["pooling"],
        normalize=options["normalize"],
        dense=options["dense"],
        input_names=_used_inputs(model, _tokenizer_inputs(tokenizer)),
    )
    for folder, layer in zip(options["dense_dirs"], module.dense, strict=True):
        _load_dense(folder, layer)  # type: ignore[arg-type]
    module.eval().requires_grad_(False)
    module.emit_features = False
    extra: dict[str, Any] = {
        "model_type": config.model_type,
        "hidden_size": module.hidden_size,
        "num_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
        "max_length": max_length,
        "sentence_transformers": bool(modules),
        "pooling": options["pooling"] if head == "base" else None,
        "normalize": module.normalize,
    }
    if task == "classification":
        extra["labels"] = [str(config.id2label[index]) for index in range(config.num_labels)]
    return module, tokenizer, task, extra


def _max_length(config: Any, tokenizer: Any, declared: int | None) -> int:
    """The longest input the teacher takes: its positions, the tokenizer's and the declared cap."""
    positions = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type in _OFFSET_POSITIONS:
        # RoBERTa-style position ids start after the padding index.
        positions -= int(config.pad_token_id or 0) + 1
    limits = [positions]
    if 0 < int(tokenizer.model_max_length) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    if declared:
        limits.append(int(declared))
    return min(limits)


def _used_inputs(model: nn.Module, names: list[str]) -> list[str]:
    """Drop ``token_type_ids`` where the family has no segment embeddings (DistilBERT)."""
    accepted = inspect.signature(model.forward).parameters
    return [name for name in names if name in accepted]


def _tokenizer_inputs(tokenizer: Any) -> list[str]:
    """The batch keys the tokenizer makes: segment ids only where it gives them (not RoBERTa's)."""
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names:
        names.append("token_type_ids")
    return names
