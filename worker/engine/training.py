"""The training loop: a student learns from teacher outputs.

Teacher outputs are computed once over the transfer set and cached (the
default), or computed every step (``online``). The loop keeps the whole
training set as tensors and draws batches by index from a seeded permutation,
so a run is deterministic on CPU and a resumed run continues exactly where the
interrupted one stopped. Checkpoints are atomic folders of safetensors files
plus a JSON state; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from worker.engine.errors import Cancelled, EngineError, NonFiniteLoss, OutOfMemory
from worker.engine.spec import TrainingSpec

Batch = dict[str, torch.Tensor]

#: Bumped whenever what is cached (or how it is computed) changes.
CACHE_VERSION = "1"


@dataclass
class Callbacks:
    """Hooks the caller gives a run; every one is optional.

    ``on_progress`` gets a dict with step, total_steps, epoch, each loss term,
    lr, samples_per_s and eta_s. ``on_event`` gets an event kind (``checkpoint``,
    ``evaluation``, ``resumed``, ``warning``, ``stage``) and its data.
    ``should_cancel`` is called every step and must be cheap.
    """

    on_progress: Callable[[dict[str, Any]], None] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None
    should_cancel: Callable[[], bool] | None = None

    def progress(self, data: dict[str, Any]) -> None:
        if self.on_progress is not None:
            self.on_progress(data)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)

    def cancelled(self) -> bool:
        return self.should_cancel is not None and self.should_cancel()


# --------------------------------------------------------------------------- devices


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (where supported) under ``auto``; fp32 on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_tensors(arrays: dict[str, np.ndarray], device: torch.device) -> Batch:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def iter_batches(tensors: Batch, batch_size: int) -> Iterator[tuple[int, Batch]]:
    n = len(next(iter(tensors.values())))
    for start in range(0, n, batch_size):
        yield start, {k: v[start : start + batch_size] for k, v in tensors.items()}


# --------------------------------------------------------------------------- teacher outputs


def cache_key(teacher_digest: str, data_digest: str, preprocessing: dict[str, Any]) -> str:
    """The cache entry for one teacher over one transfer set with one preprocessing."""
    blob = json.dumps(
        {"v": CACHE_VERSION, "teacher": teacher_digest, "data": data_digest, "pre": preprocessing},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def compute_teacher_outputs(
    teacher: Any,
    arrays: dict[str, np.ndarray],
    *,
    batch_size: int,
    hint_layer: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the teacher once over ``arrays``: (outputs, hint features or None), float32 on CPU."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    outs: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    for _, batch in iter_batches(tensors, batch_size):
        batch = {k: v.to(teacher.device) for k, v in batch.items()}
        if hint_layer is None:
            out = teacher.predict(batch)
        else:
            out, feat = teacher.predict_with_features(batch, hint_layer)
            feats.append(feat.float().cpu().numpy())
        outs.append(out.float().cpu().numpy())
    outputs = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    return outputs, (np.concatenate(feats) if feats else None)


def cached_teacher_outputs(
    teacher: Any,
    arrays: dict[str, np.ndarray],
    *,
    key: str,
    cache_dir: Path | None,
    batch_size: int,
    hint_layer: str | None = None,
    callbacks: Callbacks | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Teacher outputs from ``cache_dir`` when present there, else computed and stored.

    Stored as plain ``.npy`` (read with ``allow_pickle=False``), written to a
    temporary name and renamed, so a crash never leaves a half-written entry.
    """
    suffix = f"-{hashlib.sha256(hint_layer.encode()).hexdigest()[:12]}" if hint_layer else ""
    if cache_dir is not None:
        out_path = cache_dir / f"{key}.outputs.npy"
        feat_path = cache_dir / f"{key}{suffix}.features.npy"
        if out_path.exists() and (hint_layer is None or feat_path.exists()):
            outputs = np.load(out_path, allow_pickle=False)
            features = np.load(feat_path, allow_pickle=False) if hint_layer else None
            if callbacks:
                callbacks.event("stage", {"stage": "teacher_outputs", "cached": True})
            return outputs, features
    outputs, features = compute_teacher_outputs(
        teacher, arrays, batch_size=batch_size, hint_layer=hint_layer
    )
    if callbacks:
        callbacks.event("stage", {"stage": "teacher_outputs", "cached": False})
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_npy(cache_dir / f"{key}.outputs.npy", outputs)
        if features is not None:
            _atomic_npy(cache_dir / f"{key}{suffix}.features.npy", features)
    return outputs, features


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- schedules


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine, linear or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter], spec: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW or SGD; on CUDA the fused kernels (one launch per step instead of one per tensor)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.learning_rate,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            nesterov=spec.momentum > 0,
            fused=fused or None,
        )
    return torch.optim.AdamW(
        params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=fused or None
    )


# --------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into named tensors and JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["plain"].items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


@dataclass
class LoopState:
    """Everything besides weights that a resumed run needs to continue identically."""

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


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
    tmp = directory / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_state_tensors(student), str(tmp / "student.safetensors"))
    loss_tensors = _state_tensors(loss)
    if loss_tensors:
        save_file(loss_tensors, str(tmp / "loss.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    if best is not None:
        save_file(best, str(tmp / "best.safetensors"))
    meta = {
        "step": state.step,
        "best_score": state.best_score,
        "best_step": state.best_step,
        "epochs_without_improvement": state.epochs_without_improvement,
        "elapsed_s": state.elapsed_s,
        "history": state.history,
        "optimizer": opt_meta,
    }
    (tmp / "state.json").write_text(json.dumps(meta))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = directory / ".latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, directory / "latest")
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path | None) -> Path | None:
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
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
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
        best_step=meta["best_step"],
        epochs_without_improvement=meta["epochs_without_improvement"],
        history=meta["history"],
        elapsed_s=meta["elapsed_s"],
    )
    return state, best


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainingData:
    """What one training run reads: inputs, teacher targets and labels, train and validation."""

    train: Batch
    train_teacher: torch.Tensor | None
    train_labels: torch.Tensor | None
    val: Batch
    val_teacher: torch.Tensor
    train_features: torch.Tensor | None = None
    #: For online mode: the teacher is run on every batch instead of reading ``train_teacher``.
    online_teacher: Any = None
    hint_layer: str | None = None

    @property
    def size(self) -> int:
        return len(next(iter(self.train.values())))


@dataclass
class TrainResult:
    student: nn.Module
    history: list[dict[str, Any]]
    steps: int
    best_step: int | None
    best_score: float | None
    stop_reason: str  # completed | early_stopping | time_budget | max_steps
    resumed_from: int | None
    seconds: float
    samples_per_s: float


def _score(student_out: torch.Tensor, teacher_out: torch.Tensor, task: str, kind: str) -> dict:
    """Validation fidelity: higher is better in ``score``."""
    s = student_out.float()
    t = teacher_out.float()
    if task == "classification":
        agreement = (s.argmax(-1) == t.argmax(-1)).float().mean().item()
        return {"val/agreement": agreement, "score": agreement}
    if task == "embedding":
        cos = nn.functional.cosine_similarity(s, t, dim=-1).mean().item()
        return {"val/cosine": cos, "score": cos}
    mse = ((s - t) ** 2).mean().item()
    return {"val/output_mse": mse, "score": -mse}


@torch.no_grad()
def predict(
    module: nn.Module, tensors: Batch, batch_size: int, amp: torch.dtype | None
) -> torch.Tensor:
    """Run ``module`` over ``tensors`` in batches, in eval mode; float32 outputs."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    outs = []
    for _, batch in iter_batches(tensors, batch_size):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, amp):
            outs.append(module(**batch).float())
    module.train(was_training)
    return torch.cat(outs)


def train(
    *,
    student: nn.Module,
    loss_fn: nn.Module,
    data: TrainingData,
    spec: TrainingSpec,
    task: str,
    teacher_output_kind: str,
    device: torch.device,
    callbacks: Callbacks | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    log_every_steps: int | None = None,
    use_teacher: bool = True,
) -> TrainResult:
    """Train ``student`` against the teacher targets in ``data``; returns the best student.

    The best student (by validation fidelity, or validation loss on labels when
    ``use_teacher`` is off) is restored at the end. Non-finite losses are
    checked at every log point and before every checkpoint, so a NaN never
    reaches a checkpoint, and the error names the first bad step.
    """
    cb = callbacks or Callbacks()
    started = time.monotonic()
    n = data.size
    bs = min(spec.batch_size, n)
    steps_per_epoch = max(1, n // bs) if n % bs == 1 else math.ceil(n / bs)
    total = spec.epochs * steps_per_epoch
    if spec.max_steps is not None:
        total = min(total, spec.max_steps)
    log_every = log_every_steps or max(1, min(50, steps_per_epoch))
    amp = autocast_dtype(spec.precision, device)

    torch.manual_seed(spec.seed)
    student.to(device).train()
    loss_fn.to(device).train()
    params = [p for p in student.parameters() if p.requires_grad]
    params += [p for p in loss_fn.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, spec)

    state = LoopState()
    best: dict[str, torch.Tensor] | None = None
    resumed_from = None
    ckpt = latest_checkpoint(checkpoint_dir) if resume else None
    if ckpt is not None:
        state, best = load_checkpoint(ckpt, student=student, loss=loss_fn, optimizer=optimizer)
        resumed_from = state.step
        cb.event("resumed", {"step": state.step, "checkpoint": ckpt.name})

    budget_s = spec.max_minutes * 60.0
    last_ckpt_time = time.monotonic()
    step_losses: list[dict[str, torch.Tensor]] = []
    window_start = time.monotonic()
    window_samples = 0
    stop_reason = "completed" if total == spec.epochs * steps_per_epoch else "max_steps"
    elapsed_before = state.elapsed_s

    def check_finite() -> None:
        for offset, terms in enumerate(step_losses):
            total_loss = torch.stack([t.float() for t in terms.values()]).sum()
            if not torch.isfinite(total_loss).all():
                bad_step = state.step - len(step_losses) + offset + 1
                detail = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
                raise NonFiniteLoss(
                    f"loss became non-finite at step {bad_step} ({detail}); lower "
                    "training.learning_rate or check the transfer set for extreme values",
                    field="training.learning_rate",
                )

    def evaluate() -> dict[str, Any]:
        val_out = predict(student, data.val, max(bs, 256), amp)
        result = _score(val_out, data.val_teacher.to(val_out.device), task, teacher_output_kind)
        return result

    def checkpoint() -> None:
        nonlocal last_ckpt_time
        if checkpoint_dir is None:
            return
        check_finite()
        state.elapsed_s = elapsed_before + time.monotonic() - started
        path = save_checkpoint(
            checkpoint_dir,
            student=student,
            loss=loss_fn,
            optimizer=optimizer,
            state=state,
            best=best,
        )
        last_ckpt_time = time.monotonic()
        cb.event("checkpoint", {"step": state.step, "path": path.name})

    def log_point(epoch: int) -> None:
        nonlocal window_start, window_samples, step_losses
        check_finite()
        now = time.monotonic()
        rate = window_samples / max(now - window_start, 1e-9)
        mean_terms = {
            f"loss/{k}": float(torch.stack([t[k].detach() for t in step_losses]).mean().item())
            for k in step_losses[-1]
        }
        loss_total = sum(mean_terms.values())
        remaining = total - state.step
        row = {
            "step": state.step,
            "total_steps": total,
            "epoch": epoch,
            "loss": loss_total,
            **mean_terms,
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": rate,
            "eta_s": remaining * bs / rate if rate > 0 else None,
        }
        state.history.append({k: v for k, v in row.items() if k not in ("total_steps", "eta_s")})
        cb.progress(row)
        step_losses = []
        window_start = now
        window_samples = 0

    try:
        while state.step < total:
            epoch = state.step // steps_per_epoch
            offset = state.step % steps_per_epoch
            gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen)
            for i in range(offset, steps_per_epoch):
                if state.step >= total:
                    break
                if cb.cancelled():
                    checkpoint()
                    raise Cancelled(f"stopped at step {state.step}, after a checkpoint")
                if elapsed_before + time.monotonic() - started > budget_s:
                    stop_reason = "time_budget"
                    # The run can be taken up again from here with a larger budget.
                    checkpoint()
                    break
                idx = perm[i * bs : (i + 1) * bs] if i < steps_per_epoch - 1 else perm[i * bs :]
                factor = lr_factor(state.step, total, spec.warmup_steps, spec.scheduler)
                for group in optimizer.param_groups:
                    group["lr"] = spec.learning_rate * factor
                terms = _train_step(
                    student,
                    loss_fn,
                    optimizer,
                    data,
                    idx,
                    device,
                    amp,
                    params,
                    spec.grad_clip_norm,
                    use_teacher,
                )
                state.step += 1
                window_samples += len(idx)
                step_losses.append(terms)
                if state.step % log_every == 0:
                    log_point(epoch)
                due_steps = (
                    spec.checkpoint_every_steps is not None
                    and state.step % spec.checkpoint_every_steps == 0
                )
                due_time = (
                    spec.checkpoint_every_minutes is not None
                    and time.monotonic() - last_ckpt_time > spec.checkpoint_every_minutes * 60
                )
                if (due_steps or due_time) and state.step < total:
                    checkpoint()
            if stop_reason == "time_budget":
                break
            if step_losses:
                log_point(epoch)
            # End of an epoch: validate, keep the best student, maybe stop early.
            if state.step % steps_per_epoch == 0 or state.step >= total:
                result = evaluate()
                score = result.pop("score")
                improved = state.best_score is None or score > state.best_score + 1e-9
                if improved:
                    state.best_score, state.best_step = score, state.step
                    state.epochs_without_improvement = 0
                    best = _state_tensors(student)
                else:
                    state.epochs_without_improvement += 1
                if state.history:
                    state.history[-1].update(result)
                cb.event("evaluation", {"step": state.step, "epoch": epoch, **result})
                patience = spec.early_stopping_patience
                if patience is not None and state.epochs_without_improvement >= patience:
                    stop_reason = "early_stopping"
                    break
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(
            f"the device ran out of memory at step {state.step}; lower training.batch_size",
            field="training.batch_size",
        ) from exc
    if step_losses:
        log_point(state.step // steps_per_epoch)
    if stop_reason == "time_budget" and state.best_score is None:
        best = _state_tensors(student)
    if best is not None:
        student.load_state_dict({k: v.to(device) for k, v in best.items()})
    student.eval()
    seconds = time.monotonic() - started
    trained_steps = state.step - (resumed_from or 0)
    return TrainResult(
        student=student,
        history=state.history,
        steps=state.step,
        best_step=state.best_step,
        best_score=state.best_score,
        stop_reason=stop_reason,
        resumed_from=resumed_from,
        seconds=seconds,
        samples_per_s=trained_steps * bs / seconds if seconds > 0 else 0.0,
    )


def _train_step(
    student: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingData,
    idx: torch.Tensor,
    device: torch.device,
    amp: torch.dtype | None,
    params: list[nn.Parameter],
    clip_norm: float | None,
    use_teacher: bool,
) -> dict[str, torch.Tensor]:
    batch = {k: v[idx.to(v.device)].to(device, non_blocking=True) for k, v in data.train.items()}
    labels = None
    if data.train_labels is not None:
        labels = data.train_labels[idx.to(data.train_labels.device)].to(device, non_blocking=True)
    teacher_out: torch.Tensor | None = None
    teacher_feat: torch.Tensor | None = None
    if use_teacher:
        if data.online_teacher is not None:
            with torch.no_grad():
                if data.hint_layer is not None:
                    teacher_out, teacher_feat = data.online_teacher.predict_with_features(
                        batch, data.hint_layer
                    )
                else:
                    teacher_out = data.online_teacher.predict(batch)
        else:
            assert data.train_teacher is not None
            teacher_out = data.train_teacher[idx.to(data.train_teacher.device)].to(device)
            if data.train_features is not None:
                teacher_feat = data.train_features[idx.to(data.train_features.device)].to(device)
    student_feat: torch.Tensor | None = None
    with autocast(device, amp):
        if teacher_feat is not None:
            student_out, student_feat = forward_with_features(student, batch)
        else:
            student_out = student(**batch)
    terms = loss_fn(
        student_out,
        teacher_out,
        labels=labels,
        student_features=student_feat,
        teacher_features=teacher_feat,
    )
    total_loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    total_loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}


def forward_with_features(student: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's outputs and its penultimate features (``student.hint_layer``), flattened."""
    captured: list[torch.Tensor] = []
    layer = student.get_submodule(student.hint_layer)  # type: ignore[arg-type]
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(_first_tensor(out)))
    try:
        out = student(**batch)
    finally:
        handle.remove()
    return out, captured[-1].flatten(1)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state.mean(1)
    raise TypeError(f"cannot take features from {type(out).__name__}")
