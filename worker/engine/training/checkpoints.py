"""Checkpoints: atomic folders of safetensors files plus a JSON state; nothing is pickled.

A checkpoint holds everything a resumed run needs to continue exactly where the
interrupted one stopped: weights (student and loss), optimizer state, RNG
state, the best weights so far and the loop's counters and history.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class LoopState:
    """Everything besides weights that a resumed run needs to continue identically."""

    step: int = 0
    best_score: float | None = None
    #: What ``best_score`` measures (``validation.SCORE_BASIS``); None in checkpoints
    #: written before it was recorded.
    best_score_basis: str | None = None
    best_step: int | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def snapshot_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state dict, independent of later updates."""
    return {
        name: value.detach().cpu().contiguous().clone()
        for name, value in module.state_dict().items()
    }


def save_checkpoint(
    directory: Path,
    *,
    student: nn.Module,
    loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    best: dict[str, torch.Tensor] | None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint folder atomically and point ``latest`` at it.

    The folder is written under a temporary name and renamed; ``latest`` is a
    small file replaced atomically, so a reader never sees a partial checkpoint.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:09d}"
    final = directory / name
    temporary = directory / f".{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    _write_checkpoint_files(temporary, student, loss, optimizer, state, best)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(temporary, final)
    latest_temporary = directory / ".latest.tmp"
    latest_temporary.write_text(name)
    os.replace(latest_temporary, directory / "latest")
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint_files(
    folder: Path,
    student: nn.Module,
    loss: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: LoopState,
    best: dict[str, torch.Tensor] | None,
) -> None:
    save_file(snapshot_weights(student), str(folder / "student.safetensors"))
    loss_tensors = snapshot_weights(loss)
    if loss_tensors:
        save_file(loss_tensors, str(folder / "loss.safetensors"))
    optimizer_tensors, optimizer_meta = _split_optimizer_state(optimizer)
    save_file(optimizer_tensors, str(folder / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / "rng.safetensors"))
    if best is not None:
        save_file(best, str(folder / "best.safetensors"))
    meta = {
        "step": state.step,
        "best_score": state.best_score,
        "best_score_basis": state.best_score_basis,
        "best_step": state.best_step,
        "epochs_without_improvement": state.epochs_without_improvement,
        "elapsed_s": state.elapsed_s,
        "history": state.history,
        "optimizer": optimizer_meta,
    }
    (folder / "state.json").write_text(json.dumps(meta))
    for path in folder.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def latest_checkpoint(directory: Path | None) -> Path | None:
    """The folder ``latest`` points at in ``directory``, if it is complete; else None."""
    if directory is None or not (directory / "latest").exists():
        return None
    path = directory / (directory / "latest").read_text().strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(
    path: Path,
    *,
    student: nn.Module,
    loss: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[LoopState, dict[str, torch.Tensor] | None]:
    """Restore weights, optimizer and RNG from ``path``; returns the loop state and best weights."""
    device = next(student.parameters()).device
    student.load_state_dict(load_file(str(path / "student.safetensors"), device=str(device)))
    if (path / "loss.safetensors").exists():
        loss.load_state_dict(load_file(str(path / "loss.safetensors"), device=str(device)))
    meta = json.loads((path / "state.json").read_text())
    _load_optimizer_state(
        optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"]
    )
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    best = (
        load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
    )
    state = LoopState(
        step=meta["step"],
        best_score=meta["best_score"],
        best_score_basis=meta.get("best_score_basis"),
        best_step=meta["best_step"],
        epochs_without_improvement=meta["epochs_without_improvement"],
        history=meta["history"],
        elapsed_s=meta["elapsed_s"],
    )
    return state, best


def _split_optimizer_state(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict as named tensors (``"<param>.<key>"``) and a JSON-able rest."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain": plain}


def _load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["plain"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
