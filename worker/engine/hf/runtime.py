"""The ``huggingface`` teacher runtime: a frozen transformers encoder, run in torch."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.archive import is_zip
from worker.engine.errors import TeacherIncompatible, TeacherInvalid
from worker.engine.hf.loading import Task, load_folder
from worker.engine.hf.pooling import masked_mean
from worker.engine.hf.wrapper import HFEncoder
from worker.engine.inspection import extract_hf_bundle
from worker.engine.signature import TeacherSignature, TensorSpec
from worker.engine.teachers import TEACHER_RUNTIMES, TeacherRuntime, file_digest


class HuggingFaceTeacher(TeacherRuntime):
    """A frozen transformers encoder, run in torch."""

    module: HFEncoder
    tokenizer: Any

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
        """The batch keys the encoder takes, on the runtime's device."""
        if "input_ids" not in batch:
            raise TeacherIncompatible("a transformers teacher needs input_ids", field="dataset_id")
        names = self.module.input_names
        return {
            name: tensor.to(self.device, non_blocking=True)
            for name, tensor in batch.items()
            if name in names
        }

    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits or embeddings (N, D), float32, on the runtime's device."""
        with torch.no_grad():
            return self.module(**self._inputs(batch))

    def hint_layers(self) -> list[str]:
        """The encoder layers, last first (the last layer's states are the richest)."""
        return list(reversed(self.module.layer_names()))

    def resolve_layer(self, layer: str) -> str:
        """The module name ``layer`` means: exact, or the one module whose name ends with it."""
        names = [name for name, _ in self.module.named_modules() if name]
        if layer in names:
            return layer
        matches = [name for name in names if name.endswith("." + layer)]
        if len(matches) == 1:
            return matches[0]
        raise TeacherIncompatible(
            f"teacher has no layer {layer!r}; candidates: {', '.join(self.hint_layers())}",
            field="method.hint_layer",
        )

    def predict_with_features(self, batch: dict[str, Tensor], layer: str) -> tuple[Tensor, Tensor]:
        """Outputs and ``layer``'s token states averaged over the attention mask: (N, hidden)."""
        inputs = self._inputs(batch)
        target = self.module.get_submodule(self.resolve_layer(layer))
        captured: list[Tensor] = []

        def keep(_module: nn.Module, _args: Any, layer_output: Any) -> None:
            # ALBERT's shared layer group fires once per layer: the last call wins.
            captured.append(_first_tensor(layer_output))

        handle = target.register_forward_hook(keep)
        try:
            with torch.no_grad():
                outputs = self.module(**inputs)
        finally:
            handle.remove()
        states = captured[-1]
        mask = inputs.get("attention_mask")
        if states.dim() == 3:
            if mask is None:
                mask = torch.ones(states.shape[:2], device=states.device)
            # The encoder drops trailing columns no row attends to (see ``trim_padding``).
            return outputs, masked_mean(states, mask[:, : states.shape[1]]).float()
        return outputs, states.flatten(1).float()


def _first_tensor(layer_output: Any) -> Tensor:
    """The tensor a layer's output leads with (layers return tuples or model outputs)."""
    if isinstance(layer_output, Tensor):
        return layer_output
    if isinstance(layer_output, (tuple, list)) and layer_output:
        return _first_tensor(layer_output[0])
    if hasattr(layer_output, "last_hidden_state"):
        return layer_output.last_hidden_state
    raise TeacherIncompatible(f"cannot read features from a {type(layer_output).__name__}")


def _signature(
    module: HFEncoder, task: Task, extra: dict[str, Any], architecture: str, upload_bytes: int
) -> TeacherSignature:
    """What the teacher takes and gives, as inspection reports it for an upload."""
    width = module.output_dim
    output = "logits" if module.head == "classification" else "embedding"
    kind: Any = {"classification": "logits", "regression": "values", "embedding": "embedding"}[task]
    return TeacherSignature(
        format="huggingface",
        inputs=[TensorSpec(name, ["batch", "sequence"], "int64") for name in module.input_names],
        outputs=[TensorSpec(output, ["batch", width], "float32")],
        parameters=sum(parameter.numel() for parameter in module.parameters()),
        bytes=upload_bytes,
        task=task,
        output=output,
        output_kind=kind,
        num_classes=width if task == "classification" else None,
        output_dim=width,
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
        destination = Path(work_dir) / "huggingface"
        if destination.exists():
            shutil.rmtree(destination)
        root = extract_hf_bundle(path, destination)
    else:
        raise TeacherInvalid("a transformers teacher must be a zip of its folder", field="teacher")
    module, tokenizer, task, extra = load_folder(root)
    architectures = list(getattr(module.hf_config, "architectures", None) or [])
    if extra["sentence_transformers"]:
        architecture = f"SentenceTransformer({module.model_type})"
    else:
        architecture = architectures[0] if architectures else module.model_type
    signature = _signature(module, task, extra, architecture, _upload_bytes(path))
    digest = _upload_digest(path)
    return HuggingFaceTeacher(module, tokenizer, signature, digest, torch.device(device))


def _upload_digest(path: Path) -> str:
    """sha256 of the uploaded file, or of a folder's files (names and contents, sorted)."""
    if path.is_file():
        return file_digest([path])
    digest = hashlib.sha256()
    for file in sorted(entry for entry in path.rglob("*") if entry.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _upload_bytes(path: Path) -> int:
    """Size of the uploaded file, or of a folder's files together."""
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
