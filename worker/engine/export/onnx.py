"""ONNX export of the student, proven against the torch student in onnxruntime.

:func:`export_onnx` uses PyTorch's current (dynamo) exporter with a dynamic batch axis
(and a dynamic sequence axis for text and sequence inputs), falls back to the
TorchScript exporter when that fails, and then runs the file in onnxruntime against
the torch student at several batch sizes and sequence lengths: an ONNX file that
does not reproduce the student is an :class:`ExportFailed`, never an artifact.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from worker.engine.errors import ExportFailed

log = logging.getLogger(__name__)

OUTPUT_NAME = "outputs"
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
#: Above this many bytes of weights the graph and its weights are saved apart: protobuf
#: cannot serialise a message over 2 GiB, so leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
EXTERNAL_DATA_SUFFIX = ".data"
#: ONNX vs torch: max |diff| allowed, scaled by max(1, max |output|).
ONNX_TOLERANCE = 1e-4
CHECK_BATCH_SIZES = (1, 7)
# The TorchScript exporter is frozen; this opset is the newest it handles well.
_TORCHSCRIPT_OPSET = 17


# --------------------------------------------------------------------------- inputs


def sequence_keys(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """Inputs whose dim 1 is a sequence: text ids/masks (N, L) and sequences (N, T, F)."""
    keys = []
    for name, tensor in batch.items():
        text = name in TEXT_KEYS or (tensor.dim() == 2 and not tensor.is_floating_point())
        if text or (tensor.dim() == 3 and tensor.is_floating_point()):
            keys.append(name)
    return keys


def _resize(tensor: torch.Tensor, rows: int, length: int | None) -> torch.Tensor:
    """``tensor`` with ``rows`` rows and, if given, ``length`` steps on dim 1 (both cycling)."""
    tensor = tensor[torch.arange(rows) % tensor.shape[0]]
    if length is not None:
        tensor = tensor[:, torch.arange(length) % tensor.shape[1]]
    return tensor


def _trace_sample(
    batch: Mapping[str, torch.Tensor], sequence_inputs: list[str]
) -> dict[str, torch.Tensor]:
    # The exporter specialises sizes 0 and 1 into constants, so trace with at least 2.
    rows = max(2, next(iter(batch.values())).shape[0])
    return {
        name: _resize(tensor, rows, max(2, tensor.shape[1]) if name in sequence_inputs else None)
        for name, tensor in batch.items()
    }


def _student_inputs(
    student: nn.Module, batch: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """The batch keys the student reads (``config["input_names"]``), else all of them.

    Text batches may carry ``token_type_ids`` that a student ignores; the graph's inputs
    should be the ones a user must feed.
    """
    names = (getattr(student, "config", None) or {}).get("input_names")
    if isinstance(names, list) and names and all(name in batch for name in names):
        return {name: batch[name] for name in names}
    return batch


_Axis = TypeVar("_Axis")


def _dynamic_axes(
    sample: Mapping[str, torch.Tensor], sequence_inputs: list[str], batch: _Axis, sequence: _Axis
) -> dict[str, dict[int, _Axis]]:
    """Each input's dynamic axes: ``batch`` on dim 0, and ``sequence`` on dim 1 of sequences."""
    return {
        name: ({0: batch, 1: sequence} if name in sequence_inputs else {0: batch})
        for name in sample
    }


# --------------------------------------------------------------------------- exporters


class _PositionalInputs(nn.Module):
    """Calls ``student(**batch)`` from positional inputs, for the TorchScript tracer."""

    def __init__(self, student: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.student = student
        self.names = list(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.student(**dict(zip(self.names, inputs, strict=True)))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter chatter (deprecations, torchvision op notes) in worker logs."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        registration.setLevel(level)


def _weights_bytes(module: nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values())


def _exporter_metadata(exporter: str, fallback_reason: str | None) -> dict[str, str]:
    metadata = {"distillery.exporter": exporter}
    if fallback_reason:
        metadata["distillery.fallback_reason"] = fallback_reason[:500]
    return metadata


def _export_dynamo(
    student: nn.Module,
    sample: dict[str, torch.Tensor],
    sequence_inputs: list[str],
    path: Path,
    opset: int | None,
    external_data: bool,
    metadata: dict[str, str],
) -> None:
    import onnx_ir as ir

    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1)
    dynamic = _dynamic_axes(sample, sequence_inputs, batch, sequence)
    with _quiet_exporter():
        # Keyword inputs: dynamo reads ``forward``'s signature, so names match the batch.
        program = torch.onnx.export(
            student,
            (),
            kwargs=sample,
            input_names=list(sample),
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic,
            verbose=False,
            report=False,
        )
    assert program is not None
    program.model.metadata_props.update(metadata)
    # ir.save writes from the in-memory IR, so a model over 2 GiB never becomes one proto.
    location = path.name + EXTERNAL_DATA_SUFFIX if external_data else None
    ir.save(program.model, path, external_data=location)


def _export_torchscript(
    student: nn.Module,
    sample: dict[str, torch.Tensor],
    sequence_inputs: list[str],
    path: Path,
    opset: int | None,
    external_data: bool,
    metadata: dict[str, str],
) -> None:
    import onnx

    axes = _dynamic_axes(sample, sequence_inputs, "batch", "sequence")
    axes[OUTPUT_NAME] = {0: "batch"}
    # The TorchScript tracer takes positional inputs only.
    wrapper = _PositionalInputs(student, list(sample)).eval()
    with tempfile.TemporaryDirectory() as scratch, _quiet_exporter():
        # Exported apart and re-saved: this exporter spills large weights to many files.
        traced_file = Path(scratch) / "model.onnx"
        torch.onnx.export(
            wrapper,
            tuple(sample.values()),
            str(traced_file),
            input_names=list(sample),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset or _TORCHSCRIPT_OPSET,
            dynamo=False,
        )
        model = onnx.load(str(traced_file))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=path.name + EXTERNAL_DATA_SUFFIX,
    )


# --------------------------------------------------------------------------- the check


@dataclass
class OnnxCheck:
    """The worst ONNX-vs-torch difference over the checked shapes."""

    max_abs_diff: float
    scale: float
    shape: dict[str, list[int]]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= ONNX_TOLERANCE * self.scale

    def describe(self) -> str:
        return (
            f"max |onnx - torch| = {self.max_abs_diff:.3g} (allowed "
            f"{ONNX_TOLERANCE * self.scale:.3g}) at input shapes {self.shape}"
        )


def _run_onnx(session: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(session.run([OUTPUT_NAME], feed)[0])


def _check_cases(
    batch: Mapping[str, torch.Tensor], sequence_inputs: list[str]
) -> list[dict[str, torch.Tensor]]:
    """Batches of 1 and 7 rows, at the example's sequence length and a different one."""
    lengths: list[int | None] = [None]
    if sequence_inputs:
        full = int(batch[sequence_inputs[0]].shape[1])
        lengths = [full, full // 2 if full >= 2 else 2]
    return [
        {
            name: _resize(tensor, rows, length if name in sequence_inputs else None)
            for name, tensor in batch.items()
        }
        for rows in CHECK_BATCH_SIZES
        for length in lengths
    ]


def check_onnx(
    path: str | Path, student: nn.Module, example_batch: Mapping[str, torch.Tensor]
) -> OnnxCheck:
    """Run ``path`` in onnxruntime and the CPU ``student`` on the same batches; the worst gap."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [graph_input.name for graph_input in session.get_inputs()]
    missing = [name for name in inputs if name not in example_batch]
    if missing:
        raise ExportFailed(f"the ONNX graph wants inputs {missing} the batch does not have")
    worst = OnnxCheck(0.0, 1.0, {})
    for case in _check_cases(example_batch, sequence_keys(example_batch)):
        with torch.no_grad():
            expected = student(**case).detach().float().numpy()
        feed = {name: case[name].numpy() for name in inputs}
        actual = _run_onnx(session, feed).astype(np.float32)
        shape = {name: list(tensor.shape) for name, tensor in case.items()}
        if actual.shape != expected.shape:
            return OnnxCheck(float("inf"), 1.0, shape)
        both_nan = np.isnan(actual) & np.isnan(expected)
        diff = np.where(both_nan, 0.0, np.abs(actual.astype(np.float64) - expected))
        finite = np.abs(expected[np.isfinite(expected)])
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
        gap = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
        if gap / scale >= worst.max_abs_diff / worst.scale:
            worst = OnnxCheck(gap, scale, shape)
    return worst


# --------------------------------------------------------------------------- export


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """First line of an exception, bounded: exporter errors run to pages of advice."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def _on_cpu_eval(module: nn.Module) -> Iterator[nn.Module]:
    """The module on CPU in eval mode for the duration; device and mode restored after."""
    first = next(iter(module.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    training = module.training
    module.to("cpu").eval()
    try:
        yield module
    finally:
        module.to(device).train(training)


def export_onnx(
    student: nn.Module,
    example_batch: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    opset: int | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write ``student`` as ONNX at ``path`` and prove it reproduces the torch student.

    Input names are the student's ``config["input_names"]`` (else the batch keys), the
    output is ``"outputs"``. Every input and the
    output get a dynamic ``batch`` axis; text inputs (``input_ids``, ...) and sequence
    inputs (N, T, F) also a dynamic ``sequence`` axis on dim 1. Weights over
    ``external_data_threshold`` bytes go to ``<name>.data`` beside the graph. The
    dynamo exporter is tried first, the TorchScript one if it fails or its file does
    not match; which one wrote the file is in the model's metadata
    (:func:`onnx_export_info`). Raises :class:`ExportFailed` with the numbers when
    onnxruntime and torch differ by more than 1e-4 (relative to outputs over 1).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    batch = {
        name: tensor.detach().cpu()
        for name, tensor in _student_inputs(student, example_batch).items()
    }
    sequence_inputs = sequence_keys(batch)
    failures: list[str] = []
    with _on_cpu_eval(student):
        external_data = _weights_bytes(student) > external_data_threshold
        sample = _trace_sample(batch, sequence_inputs)
        for exporter, write in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
            metadata = _exporter_metadata(exporter, "; ".join(failures) or None)
            path.unlink(missing_ok=True)
            data_file.unlink(missing_ok=True)
            try:
                write(student, sample, sequence_inputs, path, opset, external_data, metadata)
            except Exception as exc:
                log.warning("%s ONNX export failed", exporter, exc_info=True)
                failures.append(f"{exporter} exporter failed: {_first_line(exc)}")
                continue
            try:
                check = check_onnx(path, student, batch)
            except Exception as exc:
                log.warning("%s ONNX file does not run", exporter, exc_info=True)
                failures.append(
                    f"{exporter} export does not run in onnxruntime: {_first_line(exc)}"
                )
                continue
            if check.ok:
                log.info("ONNX export with the %s exporter: %s", exporter, check.describe())
                return path
            log.warning("%s ONNX export does not match torch: %s", exporter, check.describe())
            failures.append(f"{exporter} export does not match the student: {check.describe()}")
    path.unlink(missing_ok=True)
    data_file.unlink(missing_ok=True)
    raise ExportFailed("ONNX export failed: " + "; ".join(failures), field="export.formats")


def onnx_export_info(path: str | Path) -> dict[str, str]:
    """The ``distillery.*`` metadata of an exported file (which exporter, why a fallback)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        prop.key: prop.value for prop in model.metadata_props if prop.key.startswith("distillery.")
    }
