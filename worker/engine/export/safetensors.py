"""The student as ``student.safetensors`` plus ``student_config.json``, and back.

The config names the architecture and its size knobs (``student.config``), so
:func:`load_student` rebuilds the module through the student registry and loads the
weights after checking their sha256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.engine import students
from worker.engine.errors import ExportFailed
from worker.engine.export.digests import sha256_file

CONFIG_FORMAT_VERSION = 1
#: Keys :func:`export_safetensors` adds to ``student.config``; not part of the architecture.
_BOOKKEEPING_KEYS = ("format_version", "weights", "tied")

# (storage address, offset, shape, stride): two state-dict entries with the same key
# are one tensor under two names.
_TensorView = tuple[int, int, tuple[int, ...], tuple[int, ...]]


def _split_shared(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to save and ``{alias: saved name}`` for tied weights.

    safetensors refuses tensors that share memory. An exact alias (tied embeddings) is
    saved once and recorded; any other overlap is saved as an independent copy.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[_TensorView, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        view = (storage, int(tensor.storage_offset()), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and view in seen:
            tied[name] = seen[view]
            continue
        seen[view] = name
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        # A partial view or a second view of a storage already saved gets its own copy.
        independent = whole and tensor.is_contiguous() and storage not in storages
        storages.add(storage)
        tensors[name] = (
            tensor if independent else tensor.clone(memory_format=torch.contiguous_format)
        )
    return tensors, tied


def export_safetensors(
    student: nn.Module, weights_path: str | Path, config_path: str | Path
) -> tuple[Path, Path]:
    """Write ``student.safetensors`` (the state dict) and ``student_config.json``.

    The config is ``student.config`` plus ``format_version``, the weights file's
    name, size and sha256, and ``tied`` (alias -> saved name for shared weights), so
    :func:`load_student` can rebuild the architecture and check the weights.
    """
    from safetensors.torch import save_file

    weights_path, config_path = Path(weights_path), Path(config_path)
    config = getattr(student, "config", None)
    if not isinstance(config, dict):
        raise ExportFailed("the student has no .config dict to rebuild it from")
    tensors, tied = _split_shared(student.state_dict())
    save_file(
        tensors,
        str(weights_path),
        metadata={"format": "pt", "format_version": str(CONFIG_FORMAT_VERSION)},
    )
    saved = {
        **config,
        "format_version": CONFIG_FORMAT_VERSION,
        "weights": {
            "file": weights_path.name,
            "bytes": weights_path.stat().st_size,
            "sha256": sha256_file(weights_path),
        },
        "tied": tied,
    }
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return weights_path, config_path


def load_student(weights: str | Path, config: str | Path | Mapping[str, Any]) -> nn.Module:
    """Rebuild the student from ``student_config.json`` and load its weights, in eval mode.

    Raises :class:`ExportFailed` when the weights file does not match the config's
    checksum or the state dict does not fit the rebuilt architecture.
    """
    from safetensors.torch import load_file

    # Any built-in architecture may be named by the config, the transformers one included.
    from worker.engine import components  # noqa: F401

    saved: Mapping[str, Any] = (
        config if isinstance(config, Mapping) else json.loads(Path(config).read_text())
    )
    expected = (saved.get("weights") or {}).get("sha256")
    if expected and sha256_file(weights) != expected:
        raise ExportFailed(f"{Path(weights).name} does not match the sha256 in its config")
    architecture = {key: value for key, value in saved.items() if key not in _BOOKKEEPING_KEYS}
    module = students.rebuild_student(architecture)
    state = load_file(str(weights))
    for alias, name in (saved.get("tied") or {}).items():
        state[alias] = state[name]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportFailed(f"the weights do not fit the rebuilt student: {exc}") from None
    return module.eval()
