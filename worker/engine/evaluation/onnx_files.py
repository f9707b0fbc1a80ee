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
        """``self.output`` over every row of ``arrays``, in batches, as float32 rows."""
        rows = len(next(iter(arrays.values())))
        parts = [
            np.asarray(
                self._run_one({k: v[i : i + batch_size] for k, v in arrays.items()}, [self.output])[
                    0
                ]
            )
            for i in range(0, rows, batch_size)
        ]
        out = np.concatenate(parts).astype(np.float32)
        return out.reshape(len(out), -1)

    def latency_ms(self, arrays: Mapping[str, np.ndarray], budget_s: float = 1.0) -> float:
        """Median milliseconds of one whole-file run on the first row (all outputs fetched)."""
        return paired_latency_ms([self], arrays, budget_s)[0]

    def throughput(self, arrays: Mapping[str, np.ndarray], min_seconds: float = 0.5) -> float:
        """Rows per second on up to :data:`THROUGHPUT_BATCH` rows, over at least ``min_seconds``."""
        many = {k: v[:THROUGHPUT_BATCH] for k, v in arrays.items()}
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
    feeds = [onnx_file.feeds({k: v[:1] for k, v in arrays.items()}) for onnx_file in files]
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
