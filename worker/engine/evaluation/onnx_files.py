"""Exported ONNX files run in onnxruntime: the outputs scored and the speed reported.

Teacher and student are run by the same :class:`OnnxFile` harness with the same
thread count, so their latency and throughput compare like for like on the files a
user deploys. Inputs are fed by the names the session reports, in order: by name
where the batch has that name, else by position.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from worker.engine.data.text import token_lengths
from worker.engine.layout import TO_CHANNELS_LAST, wants_channels_last

#: Intra-op threads of every timing session (stated in metrics.json).
THREADS = max(1, min(4, os.cpu_count() or 1))
THROUGHPUT_BATCH = 256
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class OnnxFile:
    """One ONNX file in an onnxruntime session; ``output`` may be an intermediate tensor."""

    def __init__(self, path: str | Path, *, output: str | None = None, threads: int = THREADS):
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = threads
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        source: str | bytes = str(self.path)
        model = onnx.load(str(self.path), load_external_data=False)
        declared = [o.name for o in model.graph.output]
        if output is not None and output not in declared:
            # e.g. the probabilities a scikit-learn ZipMap turns into maps.
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
            source = model.SerializeToString()
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.output = output or declared[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        first = self.session.get_inputs()[0].shape
        self.fixed_batch = bool(first) and first[0] == 1
        #: Whether every (rows, positions) input takes any number of positions, so rows of
        #: tokens can be fed without the columns no row attends to (:func:`token_lengths`).
        self.free_positions = all(
            not isinstance(spec.shape[1], int)
            for spec in self.session.get_inputs()
            if len(spec.shape) == 2
        )

    def feeds(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``arrays`` keyed, typed and shaped as the session's inputs want them."""
        values = list(arrays.values())
        feeds: dict[str, np.ndarray] = {}
        for position, spec in enumerate(self.session.get_inputs()):
            if spec.name in arrays:
                x = arrays[spec.name]
            elif position < len(values):
                x = values[position]
            elif spec.name == "token_type_ids" and "input_ids" in arrays:
                x = np.zeros_like(arrays["input_ids"])
            else:
                raise ValueError(f"no array for the input {spec.name!r} ({', '.join(arrays)})")
            x = np.asarray(x).astype(_DTYPES.get(spec.type, np.float32), copy=False)
            declared = list(spec.shape)
            if wants_channels_last(x.shape, declared[1:]):
                x = np.ascontiguousarray(x.transpose(TO_CHANNELS_LAST))
            if len(declared) != x.ndim:
                tail = [d if isinstance(d, int) else -1 for d in declared[1:]]
                x = x.reshape(len(x), *tail) if tail.count(-1) <= 1 else x
            feeds[spec.name] = x
        return feeds

    def _run_one(self, arrays: Mapping[str, np.ndarray], outputs: list[str] | None) -> list[Any]:
        feeds = self.feeds(arrays)
        if not self.fixed_batch:
            return list(self.session.run(outputs, feeds))
        rows = len(next(iter(feeds.values())))
        parts = [
            self.session.run(outputs, {k: v[i : i + 1] for k, v in feeds.items()})
            for i in range(rows)
        ]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]

    def predict(self, arrays: Mapping[str, np.ndarray], batch_size: int = 512) -> np.ndarray:
        """``self.output`` over every row of ``arrays``, in batches, as float32 rows.

        Rows of tokens (:func:`token_lengths`) run in order of length, each batch cut to its
        longest row, when the file takes any number of positions: padding to
        ``data.max_length`` would otherwise cost most of the run. The rows come back in
        their own order.
        """
        rows = len(next(iter(arrays.values())))
        lengths = token_lengths(arrays) if self.free_positions else None
        order = np.argsort(lengths, kind="stable") if lengths is not None else np.arange(rows)
        parts = []
        for i in range(0, rows, batch_size):
            chosen = order[i : i + batch_size]
            batch = {k: v[chosen] for k, v in arrays.items()}
            if lengths is not None:
                batch = cut_positions(batch, int(lengths[chosen].max()))
            parts.append(np.asarray(self._run_one(batch, [self.output])[0]))
        out = np.concatenate(parts).astype(np.float32)
        out = out.reshape(len(out), -1)
        restored = np.empty_like(out)
        restored[order] = out
        return restored

    def latency_ms(self, arrays: Mapping[str, np.ndarray], budget_s: float = 1.0) -> float:
        """Median milliseconds of one whole-file run on the first row (all outputs fetched)."""
        return paired_latency_ms([self], arrays, budget_s)[0]

    def throughput(self, arrays: Mapping[str, np.ndarray], min_seconds: float = 0.5) -> float:
        """Rows per second on up to :data:`THROUGHPUT_BATCH` rows, over at least ``min_seconds``."""
        many = trimmed([self], {k: v[:THROUGHPUT_BATCH] for k, v in arrays.items()})
        rows = len(next(iter(many.values())))
        self._run_one(many, None)
        calls, t0 = 0, time.perf_counter()
        while calls < 1 or time.perf_counter() - t0 < min_seconds:
            self._run_one(many, None)
            calls += 1
        return rows * calls / max(time.perf_counter() - t0, 1e-9)

    def speed(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """``onnxruntime_latency_ms`` (batch 1) and ``onnxruntime_throughput`` (large batch)."""
        return {
            "onnxruntime_latency_ms": self.latency_ms(arrays),
            "onnxruntime_throughput": self.throughput(arrays),
        }


def paired_latency_ms(
    files: Sequence[OnnxFile], arrays: Mapping[str, np.ndarray], budget_s: float = 2.0
) -> list[float]:
    """Median batch-1 milliseconds of each file, timed in turn on the same row.

    The runs alternate (one of each file, then again), so whatever slows the machine
    for a while (another process, a lower clock) falls on every file alike and their
    ratio, the speedup a verdict reads, does not depend on which was timed first.
    """
    one = trimmed(files, {k: v[:1] for k, v in arrays.items()})
    feeds = [onnx_file.feeds(one) for onnx_file in files]
    for onnx_file, one in zip(files, feeds, strict=True):
        onnx_file.session.run(None, one)
    times: list[list[float]] = [[] for _ in files]
    started = time.perf_counter()
    while len(times[0]) < 50 and (len(times[0]) < 3 or time.perf_counter() - started < budget_s):
        for onnx_file, one, kept in zip(files, feeds, times, strict=True):
            t0 = time.perf_counter()
            onnx_file.session.run(None, one)
            kept.append(time.perf_counter() - t0)
    return [statistics.median(kept) * 1000.0 for kept in times]


def cut_positions(arrays: Mapping[str, Any], length: int) -> dict[str, Any]:
    """``arrays`` (numpy arrays or torch tensors) without the positions from ``length`` on,
    in the arrays shaped like the mask."""
    shape = arrays["attention_mask"].shape
    return {k: v[:, :length] if v.shape == shape else v for k, v in arrays.items()}


def trimmed(files: Sequence[OnnxFile], arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` cut to their longest row of tokens where every one of ``files`` takes any
    number of positions (a user feeds a sentence as long as it is, not padded to
    ``data.max_length``); else unchanged."""
    lengths = token_lengths(arrays)
    if lengths is None or not len(lengths) or not all(f.free_positions for f in files):
        return dict(arrays)
    return cut_positions(arrays, int(lengths.max()))
