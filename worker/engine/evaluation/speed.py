"""Latency and throughput of torch callables (modules, or teachers' ``predict``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from worker.engine.data.text import token_lengths
from worker.engine.evaluation.onnx_files import cut_positions

Batch = Mapping[str, torch.Tensor] | torch.Tensor


def _batch_size(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    first = next(iter(batch.values()))
    return int(first.shape[0])


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without this a timer measures only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(fn: Callable[[Any], Any], batch: Batch) -> None:
    with torch.no_grad():
        fn(batch)


def measure_latency(
    fn: Callable[[Any], Any],
    example_batch_1: Batch,
    device: torch.device | str,
    warmup: int = 3,
    repeats: int = 20,
    budget_s: float = 2.0,
) -> float:
    """Median wall time in milliseconds of ``fn(example_batch_1)``, a batch of one.

    ``fn`` takes the batch as it is given (e.g. ``teacher.predict`` or
    ``lambda b: student(**b)``) and runs under ``torch.no_grad``. Warm-up and timed
    calls stop early once ``budget_s`` is spent, after at least one timed call, so a
    slow teacher cannot stall the job.
    """
    return paired_torch_latency_ms([fn], example_batch_1, device, warmup, repeats, budget_s)[0]


def paired_torch_latency_ms(
    fns: Sequence[Callable[[Any], Any]],
    example_batch_1: Batch,
    device: torch.device | str,
    warmup: int = 3,
    repeats: int = 20,
    budget_s: float = 2.0,
) -> list[float]:
    """:func:`measure_latency` of each of ``fns`` on the same batch of one, timed in turn.

    The calls alternate (one of each, then again), so whatever slows the machine for a
    while falls on every callable alike and their ratio, the speedup a verdict reads,
    does not depend on which was timed first. The budget is the whole measurement's.
    """
    device = torch.device(device)
    started = time.perf_counter()
    for _ in range(warmup):
        for fn in fns:
            _call(fn, example_batch_1)
        _sync(device)
        if time.perf_counter() - started > budget_s / 2:
            break
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(repeats, 1)):
        for fn, kept in zip(fns, times, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            _call(fn, example_batch_1)
            _sync(device)
            kept.append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s:
            break
    return [statistics.median(kept) * 1000.0 for kept in times]


def first_row(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The first row of ``tensors`` on ``device``; a row of tokens as long as it is.

    A user feeds one sentence without the padding a transfer set's rows carry to
    ``data.max_length``, as the onnxruntime harness does (``onnx_files.trimmed``).
    """
    one = {name: value[:1] for name, value in tensors.items()}
    mask = one.get("attention_mask")
    lengths = token_lengths({"attention_mask": mask.cpu().numpy()}) if mask is not None else None
    if lengths is not None:
        one = cut_positions(one, int(lengths[0]))
    return {name: value.to(device) for name, value in one.items()}


def measure_throughput(
    fn: Callable[[Any], Any],
    example_large_batch: Batch,
    device: torch.device | str,
    min_seconds: float = 1.0,
    max_calls: int = 1000,
) -> float:
    """Samples per second of ``fn`` on a large batch, timed over at least ``min_seconds``.

    One untimed warm-up call first; then calls repeat until ``min_seconds`` have
    passed (at least one call, at most ``max_calls``).
    """
    device = torch.device(device)
    n = _batch_size(example_large_batch)
    _call(fn, example_large_batch)
    _sync(device)
    calls = 0
    t0 = time.perf_counter()
    elapsed = 0.0
    while calls < max(max_calls, 1):
        _call(fn, example_large_batch)
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
    return n * calls / max(elapsed, 1e-9)


def measure_speed(
    fn: Callable[[Any], Any], tensors: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, float]:
    """``latency_ms`` on the first row (:func:`first_row`) and ``throughput`` on up to 256
    rows of ``tensors``."""
    many = {name: value[:256].to(device) for name, value in tensors.items()}
    return {
        "latency_ms": measure_latency(fn, first_row(tensors, device), device),
        "throughput": measure_throughput(fn, many, device),
    }


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes of ``module``'s state dict: its weights and buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
