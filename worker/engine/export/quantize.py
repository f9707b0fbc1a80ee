"""``student.int8.onnx``: the exported student with int8 weights, by onnxruntime's quantizer.

:func:`quantize_int8` reads the fp32 ``student.onnx`` (a drop-in file when the teacher
is ONNX: the quantized file keeps its input and output names) and writes the int8 file
beside it. A graph with convolutions is quantized statically (QDQ, weights and
activations int8, activation ranges calibrated on transfer-set rows), because
onnxruntime's CPU kernels have no int8-weight ``ConvInteger``; every other graph (MLP,
transformer, RNN: MatMul, Gemm, attention) is quantized dynamically (int8 weights,
activations quantized on the fly). The written file is run on the calibration rows
before it is kept: a file that does not run, or gives non-finite outputs, is removed
and :class:`~worker.engine.errors.ExportFailed` raised.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from worker.engine.errors import ExportFailed
from worker.engine.export.onnx import EXTERNAL_DATA_SUFFIX

log = logging.getLogger(__name__)

Method = Literal["auto", "dynamic", "static"]
#: The int8 file's name, beside ``student.onnx``.
INT8_NAME = "student.int8.onnx"
#: The most transfer-set rows static quantization calibrates activation ranges on.
CALIBRATION_ROWS = 256
_CALIBRATION_BATCH = 32
#: Ops whose presence makes a graph a convolution student (quantized statically).
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})


@dataclass
class Quantized:
    """The int8 file written, how, and its sizes."""

    path: Path
    #: ``dynamic`` or ``static``.
    method: str
    #: Whether onnxruntime's ``quant_pre_process`` (shape inference, graph optimisation) ran.
    preprocessed: bool
    #: The graph plus its external weights.
    file_bytes: int
    #: Its weights alone (:func:`onnx_weight_bytes`): what the fp32 student's ``bytes``
    #: (its state dict) become in this file.
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Method, pre-processing and bytes, as JSON."""
        return {
            "method": self.method,
            "preprocessed": self.preprocessed,
            "file_bytes": self.file_bytes,
            "weight_bytes": self.weight_bytes,
        }


def onnx_file_bytes(path: str | Path) -> int:
    """Bytes of an ONNX file plus its ``<name>.data`` external weights, where there are any."""
    path = Path(path)
    external = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    return path.stat().st_size + (external.stat().st_size if external.exists() else 0)


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes of an ONNX file's initializers (int8 weights, fp32 biases and scales), by their
    shapes and types: external weights are counted, not read."""
    graph = onnx.load(str(path), load_external_data=False).graph
    total = 0
    for tensor in graph.initializer:
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * size
    return total


def choose_method(model: onnx.ModelProto) -> str:
    """``static`` for a graph with convolutions, ``dynamic`` for every other graph."""
    ops = {node.op_type for node in model.graph.node}
    return "static" if ops & _CONV_OPS else "dynamic"


class _Calibration:
    """Transfer-set rows, as feed dicts for the fp32 file, a batch at a time.

    Implements onnxruntime's ``CalibrationDataReader`` protocol (``get_next``, ``rewind``).
    """

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def _calibration_feeds(
    fp32: Path, arrays: Mapping[str, np.ndarray], rows: int
) -> list[dict[str, np.ndarray]]:
    """Up to ``rows`` rows of ``arrays``, typed and named for ``fp32``'s inputs, in batches."""
    from worker.engine.evaluation.onnx_files import OnnxFile

    session = OnnxFile(fp32, threads=1)
    total = min(rows, len(next(iter(arrays.values()))))
    step = 1 if session.fixed_batch else _CALIBRATION_BATCH
    return [
        session.feeds({k: v[i : i + step] for k, v in arrays.items()})
        for i in range(0, total, step)
    ]


def _preprocess(fp32: Path, out: Path, external: bool) -> bool:
    """onnxruntime's ``quant_pre_process`` of ``fp32`` into ``out``; False where it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(
            str(fp32),
            str(out),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            external_data_location=out.name + EXTERNAL_DATA_SUFFIX if external else None,
        )
    except Exception as exc:  # shape inference raises many types; quantize without it
        log.info("quant_pre_process failed (%s); quantizing without it", exc)
        return False
    return out.exists()


def _quantize(
    source: Path,
    target: Path,
    method: str,
    calibration: _Calibration | None,
    external: bool,
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if method == "dynamic":
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
        )
        return
    if calibration is None or not len(calibration):
        raise ExportFailed("static int8 quantization needs calibration rows")
    quantize_static(
        str(source),
        str(target),
        calibration,  # a CalibrationDataReader by protocol
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
    )


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + EXTERNAL_DATA_SUFFIX).unlink(missing_ok=True)


def _check_runs(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Run the int8 file on ``feeds``: it must load and give finite float outputs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for feed in feeds:
        for value in session.run(None, feed):
            array = np.asarray(value)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ExportFailed("the int8 student gives non-finite outputs")


def quantize_int8(
    fp32: str | Path,
    calibration: Mapping[str, np.ndarray],
    *,
    out: str | Path | None = None,
    method: Method = "auto",
    calibration_rows: int = CALIBRATION_ROWS,
) -> Quantized:
    """Write the int8 version of the ONNX file ``fp32`` (``student.int8.onnx`` beside it).

    ``calibration`` holds transfer-set training rows by input name (or in input order),
    as the evaluation harness feeds the fp32 file: static quantization calibrates on up
    to ``calibration_rows`` of them, and the written file is checked on them. ``method``
    ``auto`` picks static for graphs with convolutions, dynamic otherwise. Weights kept
    in ``<name>.data`` beside ``fp32`` are read from there, and the int8 file keeps its
    weights the same way. Raises :class:`ExportFailed` (the int8 file removed) when
    quantization fails or its file does not run.
    """
    fp32 = Path(fp32)
    target = Path(out) if out is not None else fp32.with_name(INT8_NAME)
    external = fp32.with_name(fp32.name + EXTERNAL_DATA_SUFFIX).exists()
    chosen = method
    if method == "auto":
        chosen = choose_method(onnx.load(str(fp32), load_external_data=False))  # type: ignore[assignment]
    _remove(target)
    try:
        feeds = _calibration_feeds(fp32, calibration, calibration_rows)
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=target.parent) as work:
            prepared = Path(work) / "prepared.onnx"
            preprocessed = _preprocess(fp32, prepared, external)
            source = prepared if preprocessed else fp32
            reader = _Calibration(feeds) if chosen == "static" else None
            try:
                _quantize(source, target, chosen, reader, external)
            except Exception:
                if not preprocessed:
                    raise
                # A pre-processed graph the quantizer cannot take: the original may do.
                log.info("quantizing the pre-processed graph failed; trying the original")
                preprocessed = False
                _remove(target)
                _quantize(fp32, target, chosen, reader, external)
        _check_runs(target, feeds[:4])
    except Exception as exc:
        _remove(target)
        if isinstance(exc, ExportFailed):
            raise
        raise ExportFailed(f"int8 quantization ({chosen}) failed: {_first_line(exc)}") from exc
    return Quantized(
        target, str(chosen), preprocessed, onnx_file_bytes(target), onnx_weight_bytes(target)
    )


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
