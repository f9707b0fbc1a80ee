"""Hugging Face transformers teachers and the ``hf_encoder`` student.

A teacher is a zip of a transformers folder (``config.json``, safetensors
weights, tokenizer files), optionally a sentence-transformers folder
(``modules.json``). Loading never runs code from the upload: the model class
comes from transformers' own mappings for an allowlisted ``model_type``,
``auto_map`` is never followed, weights are read from safetensors only, and
the sentence-transformers modules (pooling, dense, normalize) are rebuilt here
from their JSON configs rather than imported by the class path they name.

The same wrapper, :class:`HFEncoder`, serves as the teacher's frozen module and
as the student, so both compute their output (logits or pooled embedding) the
same way.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.archive import bundle_root, contained, extract, is_zip
from worker.engine.errors import (
    SpecInvalid,
    TeacherIncompatible,
    TeacherInvalid,
    UnsupportedFormat,
)
from worker.engine.inspection import refuse_per_token_heads
from worker.engine.signature import TeacherSignature, TensorSpec
from worker.engine.spec import StudentSpec
from worker.engine.students import STUDENTS, StudentContext
from worker.engine.teachers import TEACHER_RUNTIMES, TeacherRuntime, file_digest

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
_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "camembert", "mpnet"})

#: Batch keys a text encoder can take, in the order of :meth:`HFEncoder.forward`.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: sentence-transformers pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

#: Activations a sentence-transformers Dense module may name; anything else is refused.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "torch.nn.modules.activation.Tanh": nn.Tanh,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.activation.GELU": nn.GELU,
    "torch.nn.modules.activation.Sigmoid": nn.Sigmoid,
    "torch.nn.modules.linear.Identity": nn.Identity,
}
_ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")

Head = Literal["classification", "base"]
Task = Literal["classification", "regression", "embedding"]


# --------------------------------------------------------------------------- pooling


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (N, L, H) over the positions where ``mask`` (N, L) is set."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pool(hidden: Tensor, mask: Tensor, modes: list[str]) -> Tensor:
    """sentence-transformers pooling of token states (N, L, H), modes concatenated.

    Follows ``sentence_transformers`` Pooling on padded input, so an embedding
    distilled here equals ``SentenceTransformer.encode`` of the same folder.
    """
    out: list[Tensor] = []
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    for mode in modes:
        if mode == "cls":
            # The first attended token, which also handles left padding.
            first = mask.to(torch.int32).argmax(dim=1)
            index = first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            out.append(torch.gather(hidden, 1, index).squeeze(1))
        elif mode == "max":
            out.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (hidden * weights).sum(1)
            count = weights.sum(1).clamp(min=1e-9)
            out.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            positions = torch.arange(
                1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype
            )
            left_pad = mask.to(torch.int32).argmax(dim=1).to(hidden.dtype)
            position_weights = weights * (positions.view(1, -1, 1) - left_pad.view(-1, 1, 1))
            total = (hidden * position_weights).sum(1)
            out.append(total / position_weights.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":
            length = hidden.shape[1]
            values, flipped = mask.to(torch.int32).flip(1).max(1)
            flipped = torch.where(values == 0, length - 1, flipped)
            index = (length - flipped - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            out.append(torch.gather(hidden * weights, 1, index).squeeze(1))
        else:
            raise TeacherIncompatible(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


# --------------------------------------------------------------------------- the wrapper


class HFEncoder(nn.Module):
    """A transformers encoder behind the engine's batch interface.

    ``forward(input_ids, attention_mask, token_type_ids)`` returns the
    classifier's logits (``head == "classification"``) or the pooled token
    states, passed through the Dense layers and L2-normalised when configured.
    ``feature`` sees the mask-averaged last hidden state (N, hidden) on every
    call: that is the student's hint layer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_type: str,
        head: Head,
        pooling: list[str],
        normalize: bool,
        dense: list[dict[str, Any]],
        input_names: list[str],
    ) -> None:
        super().__init__()
        self.model = model
        self.model_type = model_type
        self.head = head
        self.pooling = list(pooling)
        self.normalize = normalize
        self.dense_config = [dict(d) for d in dense]
        self.dense = nn.ModuleList(
            nn.Sequential(
                nn.Linear(d["in_features"], d["out_features"], bias=d.get("bias", True)),
                _activation(d.get("activation_function")),
            )
            for d in dense
        )
        self.feature = nn.Identity()
        # A frozen teacher skips the feature (and, for classifiers, all hidden states).
        self.emit_features = True
        self.input_names = [n for n in TEXT_INPUTS if n in input_names]
        # The student contract: rebuildable config, hint layer and its width.
        self.config: dict[str, Any] = {}
        self.hint_layer = "feature"
        self.feature_dim = self.hidden_size

    @property
    def hf_config(self) -> Any:
        """The wrapped model's transformers config."""
        return self.model.config

    @property
    def hidden_size(self) -> int:
        """Width of the token states (and of ``feature``)."""
        return int(self.hf_config.hidden_size)

    @property
    def output_dim(self) -> int:
        """Width of ``forward``'s output: labels, or the pooled (and projected) embedding."""
        if self.head == "classification":
            return int(self.hf_config.num_labels)
        if self.dense_config:
            return int(self.dense_config[-1]["out_features"])
        return self.hidden_size * len(self.pooling)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in self.input_names:
            kwargs["token_type_ids"] = token_type_ids
        if self.head == "classification":
            out = self.model(**kwargs, output_hidden_states=self.emit_features)
            if self.emit_features:
                self.feature(masked_mean(out.hidden_states[-1], attention_mask))
            return out.logits.float()
        # Pool in fp32: bf16 sums over long sequences lose the precision cosine losses need.
        hidden = self.model(**kwargs).last_hidden_state.float()
        if self.emit_features:
            self.feature(masked_mean(hidden, attention_mask))
        pooled = pool(hidden, attention_mask, self.pooling)
        for layer in self.dense:
            pooled = layer(pooled)
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        return pooled.float()

    def layer_stack(self) -> str:
        """Dotted name (within this module) of the transformer's list of layers."""
        prefix = "model."
        base = self.model.base_model
        if base is not self.model:
            prefix += f"{self.model.base_model_prefix}."
        return prefix + LAYER_STACKS[self.model_type]

    def layer_names(self) -> list[str]:
        """Dotted names of the encoder layers, first to last."""
        stack = self.get_submodule(self.layer_stack())
        return [f"{self.layer_stack()}.{i}" for i in range(len(stack))]  # type: ignore[arg-type]


def _activation(name: str | None) -> nn.Module:
    if name is None:
        # sentence-transformers' Dense default.
        return nn.Tanh()
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        known = ", ".join(sorted(_ACTIVATIONS))
        raise TeacherIncompatible(
            f"Dense activation {name!r} is not supported; known: {known}"
        ) from None


# --------------------------------------------------------------------------- transformers classes


def _config_class(model_type: str) -> Any:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in ALLOWED_MODEL_TYPES:
        allowed = ", ".join(sorted(ALLOWED_MODEL_TYPES))
        raise TeacherIncompatible(
            f"transformers model_type {model_type!r} is not supported; supported encoder "
            f"families: {allowed}",
            field="teacher",
        )
    return CONFIG_MAPPING[model_type]


def _model_class(config: Any, head: Head) -> Any:
    """The built-in transformers class for ``config``: never a class named by ``auto_map``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
        MODEL_MAPPING,
    )

    mapping = (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if head == "classification" else MODEL_MAPPING
    )
    return mapping[type(config)]


def _make_config(raw: dict[str, Any]) -> Any:
    """A built-in config object from a config.json dict (``auto_map`` dropped, never followed)."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        raise TeacherInvalid("config.json has no model_type", field="teacher")
    cls = _config_class(model_type)
    clean = {k: v for k, v in raw.items() if k != "auto_map"}
    try:
        return cls.from_dict(clean)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise TeacherInvalid(f"config.json does not describe a {model_type} model: {exc}") from None


def _make_model(config: Any, head: Head, *, pooler: bool = True) -> nn.Module:
    """A freshly initialised built-in model; ``pooler=False`` leaves out an unused pooler."""
    cls = _model_class(config, head)
    kwargs = {}
    if not pooler and "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    model: nn.Module = cls(config, **kwargs)
    return model


# --------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TeacherInvalid(f"cannot read {path.name}: {exc}", field="teacher") from None
    if not isinstance(data, dict):
        raise TeacherInvalid(f"{path.name} is not a JSON object", field="teacher")
    return data


def _require_safetensors(folder: Path, what: str) -> None:
    if (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file():
        return
    pickled = [
        p.name
        for p in folder.iterdir()
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
    ]
    if pickled:
        raise UnsupportedFormat(
            f"{what} has weights only in {', '.join(sorted(pickled))}, a pickle-based (or "
            "framework-specific) format that is never loaded. Convert it to safetensors where "
            "you trust it: transformers model.save_pretrained(folder, safe_serialization=True), "
            "or sentence-transformers model.save(folder, safe_serialization=True); then zip the "
            "folder again.",
            field="teacher",
        )
    raise TeacherInvalid(f"{what} has no model.safetensors", field="teacher")


def _head_and_task(config: Any) -> tuple[Head, Task]:
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
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
        loaded, info = _model_class(config, head).from_pretrained(
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
    missing = sorted(info.get("missing_keys") or [])
    if head == "base":
        # Bare encoders are pooled here, not through the pooler an MLM checkpoint may lack.
        missing = [k for k in missing if not k.startswith("pooler.")]
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        shown = ", ".join(str(k) for k in (missing + mismatched)[:5])
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
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise TeacherInvalid("modules.json is not a list of modules", field="teacher")
    modules = []
    for entry in sorted(raw, key=lambda e: int(e.get("idx", 0))):
        path = str(entry.get("type", ""))
        kind = path.rsplit(".", 1)[-1]
        if not path.startswith("sentence_transformers.") or kind not in _ST_MODULES:
            raise TeacherIncompatible(
                f"sentence-transformers module {path!r} is not supported; supported: "
                f"{', '.join(_ST_MODULES)}",
                field="teacher",
            )
        modules.append({**entry, "kind": kind})
    kinds = "".join(m["kind"][0] for m in modules)
    if not re.fullmatch(r"TPD*N?", kinds):
        raise TeacherIncompatible(
            "sentence-transformers modules must be Transformer, Pooling, any Dense layers and "
            f"an optional Normalize, in that order; found {[m['kind'] for m in modules]}",
            field="teacher",
        )
    return modules


def _sentence_transformers_head(root: Path, modules: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooling modes, Dense layers (configs and folders), normalisation and text options."""
    model_dir = _within(root, modules[0].get("path") or "")
    head: dict[str, Any] = {
        "model_dir": model_dir,
        "pooling": ["mean"],
        "dense": [],
        "dense_dirs": [],
        "normalize": False,
        "max_length": None,
        "lowercase": False,
    }
    if (model_dir / "sentence_bert_config.json").is_file():
        st = _read_json(model_dir / "sentence_bert_config.json")
        task = st.get("transformer_task", "feature-extraction")
        text = (st.get("modality_config") or {}).get("text") or {}
        if task != "feature-extraction" or text.get("method", "forward") != "forward":
            raise TeacherIncompatible(
                f"sentence-transformers transformer task {task!r} is not supported",
                field="teacher",
            )
        head["max_length"] = st.get("max_seq_length")
        head["lowercase"] = bool(st.get("do_lower_case", False))
    for m in modules[1:]:
        folder = _within(root, m.get("path") or "")
        cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise TeacherIncompatible(
                f"sentence-transformers {m['kind']} on {cfg['module_input_name']!r} is not "
                "supported (only on the sentence embedding)",
                field="teacher",
            )
        if m["kind"] == "Pooling":
            head["pooling"] = _pooling_modes(cfg)
        elif m["kind"] == "Dense":
            head["dense"].append(
                {
                    "in_features": int(cfg["in_features"]),
                    "out_features": int(cfg["out_features"]),
                    "bias": bool(cfg.get("bias", True)),
                    "activation_function": cfg.get(
                        "activation_function", "torch.nn.modules.activation.Tanh"
                    ),
                }
            )
            head["dense_dirs"].append(folder)
        elif m["kind"] == "Normalize":
            head["normalize"] = True
    return head


def _pooling_modes(config: dict[str, Any]) -> list[str]:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise TeacherIncompatible(f"unknown pooling mode {unknown[0]!r}", field="teacher")
    # sentence-transformers concatenates in its own fixed order.
    return [m for m in POOLING_MODES if m in modes]


def _load_dense(folder: Path, module: nn.Sequential) -> None:
    from safetensors.torch import load_file

    _require_safetensors(folder, f"sentence-transformers module {folder.name}")
    try:
        state = load_file(str(folder / "model.safetensors"))
        module[0].load_state_dict(
            {
                k.removeprefix("linear."): v.float()
                for k, v in state.items()
                if k.startswith("linear.")
            }
        )
    except Exception as exc:
        raise TeacherInvalid(f"{folder.name} weights do not match its config: {exc}") from None


def _within(root: Path, relative: str) -> Path:
    return contained(root, relative)


def _digest(path: Path) -> str:
    """sha256 of the uploaded file, or of a folder's files (names and contents, sorted)."""
    if path.is_file():
        return file_digest([path])
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_folder(root: Path) -> tuple[HFEncoder, Any, Task, dict[str, Any]]:
    """Build the frozen :class:`HFEncoder` and tokenizer from an extracted transformers folder.

    Returns ``(module, tokenizer, task, extra)``; ``extra`` describes pooling,
    normalisation and sizes for the signature.
    """
    modules = _sentence_transformers_modules(root)
    st = _sentence_transformers_head(root, modules) if modules else None
    model_dir = st["model_dir"] if st else root
    if not (model_dir / "config.json").is_file():
        raise TeacherInvalid("the bundle has no config.json", field="teacher")
    config = _make_config(_read_json(model_dir / "config.json"))
    _require_safetensors(model_dir, "the transformers model")
    head: Head
    task: Task
    if st:
        head, task = "base", "embedding"
    else:
        head, task = _head_and_task(config)
    tokenizer = _load_tokenizer(model_dir, root, lowercase=bool(st and st["lowercase"]))
    max_length = _max_length(config, tokenizer, st["max_length"] if st else None)
    tokenizer.model_max_length = max_length
    # Segment ids only where the tokenizer produces them (RoBERTa's does not).
    input_names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names:
        input_names.append("token_type_ids")

    model = _load_pretrained(config, model_dir, head)
    pooling = st["pooling"] if st else ["mean"]
    module = HFEncoder(
        model,
        model_type=config.model_type,
        head=head,
        pooling=pooling,
        normalize=bool(st and st["normalize"]),
        dense=st["dense"] if st else [],
        input_names=_used_inputs(model, input_names),
    )
    for folder, layer in zip(st["dense_dirs"] if st else [], module.dense, strict=True):
        _load_dense(folder, layer)  # type: ignore[arg-type]
    module.eval().requires_grad_(False)
    module.emit_features = False
    extra: dict[str, Any] = {
        "model_type": config.model_type,
        "hidden_size": module.hidden_size,
        "num_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
        "max_length": max_length,
        "sentence_transformers": bool(st),
        "pooling": pooling if head == "base" else None,
        "normalize": module.normalize,
    }
    if task == "classification":
        extra["labels"] = [str(config.id2label[i]) for i in range(config.num_labels)]
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
    return [n for n in names if n in accepted]


def _load_tokenizer(model_dir: Path, root: Path, *, lowercase: bool) -> Any:
    from transformers import AutoTokenizer

    for folder in (model_dir, root):
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    str(folder), local_files_only=True, trust_remote_code=False
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TeacherInvalid(f"cannot load the tokenizer: {exc}", field="teacher") from None
            return LowercasingTokenizer(tokenizer) if lowercase else tokenizer
    raise TeacherIncompatible(
        "the transformers folder has no tokenizer (tokenizer.json or tokenizer_config.json); "
        "save it with tokenizer.save_pretrained(folder) beside the model",
        field="teacher",
    )


class LowercasingTokenizer:
    """A tokenizer that lowercases texts first, as sentence-transformers' ``do_lower_case`` does.

    Everything else is the wrapped tokenizer's.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str):
            text = text.lower()
        elif isinstance(text, (list, tuple)):
            text = [t.lower() if isinstance(t, str) else t for t in text]
        return self.tokenizer(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tokenizer":
            object.__setattr__(self, name, value)
        else:
            setattr(self.tokenizer, name, value)


# --------------------------------------------------------------------------- the runtime


class HuggingFaceTeacher(TeacherRuntime):
    """A frozen transformers encoder, run in torch."""

    def __init__(
        self,
        module: HFEncoder,
        tokenizer: Any,
        signature: TeacherSignature,
        digest: str,
        device: torch.device,
    ) -> None:
        self.module = module.to(device)
        self.tokenizer = tokenizer
        self.signature = signature
        self.digest = digest
        self.device = device
        self.backend = "torch"

    def _inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if "input_ids" not in batch:
            raise TeacherIncompatible("a transformers teacher needs input_ids", field="dataset_id")
        names = self._encoder.input_names
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in names}

    @property
    def _encoder(self) -> HFEncoder:
        assert isinstance(self.module, HFEncoder)
        return self.module

    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits or embeddings (N, D), float32, on the runtime's device."""
        with torch.no_grad():
            return self._encoder(**self._inputs(batch))

    def hint_layers(self) -> list[str]:
        """The encoder layers, last first (the last layer's states are the richest)."""
        return list(reversed(self._encoder.layer_names()))

    def resolve_layer(self, layer: str) -> str:
        """The module name ``layer`` means: exact, or the one module whose name ends with it."""
        names = [n for n, _ in self._encoder.named_modules() if n]
        if layer in names:
            return layer
        matches = [n for n in names if n.endswith("." + layer)]
        if len(matches) == 1:
            return matches[0]
        raise TeacherIncompatible(
            f"teacher has no layer {layer!r}; candidates: {', '.join(self.hint_layers())}",
            field="method.hint_layer",
        )

    def predict_with_features(self, batch: dict[str, Tensor], layer: str) -> tuple[Tensor, Tensor]:
        """Outputs and ``layer``'s token states averaged over the attention mask: (N, hidden)."""
        inputs = self._inputs(batch)
        target = self._encoder.get_submodule(self.resolve_layer(layer))
        captured: list[Tensor] = []

        def keep(_module: nn.Module, _args: Any, out: Any) -> None:
            # ALBERT's shared layer group fires once per layer: the last call wins.
            captured.append(_first_tensor(out))

        handle = target.register_forward_hook(keep)
        try:
            with torch.no_grad():
                out = self._encoder(**inputs)
        finally:
            handle.remove()
        states = captured[-1]
        mask = inputs.get("attention_mask")
        if states.dim() == 3:
            if mask is None:
                mask = torch.ones(states.shape[:2], device=states.device)
            return out, masked_mean(states, mask).float()
        return out, states.flatten(1).float()


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TeacherIncompatible(f"cannot read features from a {type(out).__name__}")


def _signature(
    module: HFEncoder, task: Task, extra: dict[str, Any], architecture: str, size: int
) -> TeacherSignature:
    dim = module.output_dim
    output = "logits" if module.head == "classification" else "embedding"
    kind: Any = {"classification": "logits", "regression": "values", "embedding": "embedding"}[task]
    return TeacherSignature(
        format="huggingface",
        inputs=[TensorSpec(n, ["batch", "sequence"], "int64") for n in module.input_names],
        outputs=[TensorSpec(output, ["batch", dim], "float32")],
        parameters=sum(p.numel() for p in module.parameters()),
        bytes=size,
        task=task,
        output=output,
        output_kind=kind,
        num_classes=dim if task == "classification" else None,
        output_dim=dim,
        architecture=architecture,
        modality="text",
        extra=extra,
    )


@TEACHER_RUNTIMES.register("huggingface")
def load_huggingface(
    path: str | Path, *, device: torch.device, work_dir: Path
) -> HuggingFaceTeacher:
    """Load a zipped (or unpacked) transformers / sentence-transformers folder as a teacher.

    The zip is extracted into ``work_dir``; nothing from it is executed.
    """
    path = Path(path)
    if path.is_dir():
        root = path
    elif is_zip(path):
        dest = Path(work_dir) / "huggingface"
        if dest.exists():
            shutil.rmtree(dest)
        root = bundle_root(extract(path, dest))
    else:
        raise TeacherInvalid("a transformers teacher must be a zip of its folder", field="teacher")
    module, tokenizer, task, extra = load_folder(root)
    architectures = list(getattr(module.hf_config, "architectures", None) or [])
    if extra["sentence_transformers"]:
        architecture = f"SentenceTransformer({module.model_type})"
    else:
        architecture = architectures[0] if architectures else module.model_type
    signature = _signature(module, task, extra, architecture, _size(path))
    return HuggingFaceTeacher(module, tokenizer, signature, _digest(path), torch.device(device))


# --------------------------------------------------------------------------- the student


def _student_config(
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
        model = _make_model(config, head, pooler=head != "base")
    return sum(p.numel() for p in model.parameters())


def _heads_for(hidden: int, teacher_config: Any) -> int:
    """Heads of the teacher's head size where possible, else the most that divide ``hidden``."""
    head_dim = teacher_config.hidden_size // teacher_config.num_attention_heads
    heads = max(1, min(hidden // head_dim, teacher_config.num_attention_heads))
    while hidden % heads:
        heads -= 1
    return heads


def _choose_size(
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
        one = _count(_student_config(teacher_config, layers=1, hidden=h, heads=heads), head)
        two = _count(_student_config(teacher_config, layers=2, hidden=h, heads=heads), head)
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

    Depth (and width, if the budget needs it) follow :func:`_choose_size`. With
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
    layers, hidden, heads = _choose_size(
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
    config = _student_config(tconfig, layers=layers, hidden=hidden, heads=heads)
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
    model = _make_model(config, head, pooler=head != "base")
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
        hf_config = _make_config(raw)
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
