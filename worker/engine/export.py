"""The student's artifacts: ONNX and safetensors + config.

:func:`export_onnx` uses PyTorch's current (dynamo) exporter with a dynamic batch axis
(and a dynamic sequence axis for text and sequence inputs), falls back to the
TorchScript exporter when that fails, and then runs the file in onnxruntime against
the torch student at several batch sizes and sequence lengths: an ONNX file that
does not reproduce the student is an :class:`ExportFailed`, never an artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
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

# The model card and the curves moved to worker.engine.report; kept here until every
# importer uses that package.
from worker.engine.report import plot_training_curves as plot_training_curves
from worker.engine.report import write_model_card as write_model_card

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
_LEGACY_OPSET = 17
CONFIG_FORMAT_VERSION = 1


# --------------------------------------------------------------------------- ONNX


class _Positional(nn.Module):
    """Calls ``student(**batch)`` from positional inputs, for the TorchScript tracer."""

    def __init__(self, student: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.student = student
        self.names = list(names)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.student(**dict(zip(self.names, args, strict=True)))


def sequence_keys(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """Inputs whose dim 1 is a sequence: text ids/masks (N, L) and sequences (N, T, F)."""
    keys = []
    for name, t in batch.items():
        text = name in TEXT_KEYS or (t.dim() == 2 and not t.is_floating_point())
        if text or (t.dim() == 3 and t.is_floating_point()):
            keys.append(name)
    return keys


def _resize(t: torch.Tensor, n: int, length: int | None) -> torch.Tensor:
    """``t`` with ``n`` rows (cycling) and, if given, ``length`` steps on dim 1 (cycling)."""
    t = t[torch.arange(n) % t.shape[0]]
    if length is not None:
        t = t[:, torch.arange(length) % t.shape[1]]
    return t


def _export_sample(batch: Mapping[str, torch.Tensor], seq: list[str]) -> dict[str, torch.Tensor]:
    # The exporter specialises sizes 0 and 1 into constants, so trace with at least 2.
    n = max(2, next(iter(batch.values())).shape[0])
    return {k: _resize(v, n, max(2, v.shape[1]) if k in seq else None) for k, v in batch.items()}


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
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _metadata(exporter: str, note: str | None) -> dict[str, str]:
    meta = {"distillery.exporter": exporter}
    if note:
        meta["distillery.fallback_reason"] = note[:500]
    return meta


_Axis = TypeVar("_Axis")


def _dynamic_axes(
    sample: Mapping[str, torch.Tensor], seq: list[str], batch: _Axis, sequence: _Axis
) -> dict[str, dict[int, _Axis]]:
    """Each input's dynamic axes: ``batch`` on dim 0, and ``sequence`` on dim 1 of ``seq``."""
    return {k: ({0: batch, 1: sequence} if k in seq else {0: batch}) for k in sample}


def _export_dynamo(
    student: nn.Module,
    sample: dict[str, torch.Tensor],
    seq: list[str],
    path: Path,
    opset: int | None,
    external: bool,
    meta: dict[str, str],
) -> None:
    import onnx_ir as ir

    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1)
    dynamic = _dynamic_axes(sample, seq, batch, sequence)
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
    program.model.metadata_props.update(meta)
    # ir.save writes from the in-memory IR, so a model over 2 GiB never becomes one proto.
    location = path.name + EXTERNAL_DATA_SUFFIX if external else None
    ir.save(program.model, path, external_data=location)


def _export_torchscript(
    student: nn.Module,
    sample: dict[str, torch.Tensor],
    seq: list[str],
    path: Path,
    opset: int | None,
    external: bool,
    meta: dict[str, str],
) -> None:
    import onnx

    axes = _dynamic_axes(sample, seq, "batch", "sequence")
    axes[OUTPUT_NAME] = {0: "batch"}
    # The TorchScript tracer takes positional inputs only.
    wrapper = _Positional(student, list(sample)).eval()
    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        # Exported apart and re-saved: this exporter spills large weights to many files.
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapper,
            tuple(sample.values()),
            str(raw),
            input_names=list(sample),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset or _LEGACY_OPSET,
            dynamo=False,
        )
        model = onnx.load(str(raw))
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + EXTERNAL_DATA_SUFFIX,
    )


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
    batch: Mapping[str, torch.Tensor], seq: list[str]
) -> list[dict[str, torch.Tensor]]:
    """Batches of 1 and 7 rows, at the example's sequence length and a different one."""
    lengths: list[int | None] = [None]
    if seq:
        full = int(batch[seq[0]].shape[1])
        lengths = [full, full // 2 if full >= 2 else 2]
    return [
        {k: _resize(v, n, length if k in seq else None) for k, v in batch.items()}
        for n in CHECK_BATCH_SIZES
        for length in lengths
    ]


def check_onnx(
    path: str | Path, student: nn.Module, example_batch: Mapping[str, torch.Tensor]
) -> OnnxCheck:
    """Run ``path`` in onnxruntime and the CPU ``student`` on the same batches; the worst gap."""
    import onnxruntime as ort

    seq = sequence_keys(example_batch)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    missing = [k for k in inputs if k not in example_batch]
    if missing:
        raise ExportFailed(f"the ONNX graph wants inputs {missing} the batch does not have")
    worst = OnnxCheck(0.0, 1.0, {})
    for case in _check_cases(example_batch, seq):
        with torch.no_grad():
            ref = student(**case).detach().float().numpy()
        feed = {k: case[k].numpy() for k in inputs}
        got = _run_onnx(session, feed).astype(np.float32)
        shape = {k: list(v.shape) for k, v in case.items()}
        if got.shape != ref.shape:
            return OnnxCheck(float("inf"), 1.0, shape)
        both_nan = np.isnan(got) & np.isnan(ref)
        diff = np.where(both_nan, 0.0, np.abs(got.astype(np.float64) - ref))
        finite = np.abs(ref[np.isfinite(ref)])
        scale = max(1.0, float(finite.max()) if finite.size else 1.0)
        gap = float(np.nan_to_num(diff, nan=np.inf).max()) if diff.size else 0.0
        if gap / scale >= worst.max_abs_diff / worst.scale:
            worst = OnnxCheck(gap, scale, shape)
    return worst


def _student_inputs(
    student: nn.Module, batch: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """The batch keys the student reads (``config["input_names"]``), else all of them.

    Text batches may carry ``token_type_ids`` that a student ignores; the graph's inputs
    should be the ones a user must feed.
    """
    names = (getattr(student, "config", None) or {}).get("input_names")
    if isinstance(names, list) and names and all(n in batch for n in names):
        return {n: batch[n] for n in names}
    return batch


def _summary(exc: BaseException, limit: int = 300) -> str:
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
    batch = {k: v.detach().cpu() for k, v in _student_inputs(student, example_batch).items()}
    seq = sequence_keys(batch)
    failures: list[str] = []
    with _on_cpu_eval(student):
        external = _weights_bytes(student) > external_data_threshold
        sample = _export_sample(batch, seq)
        for exporter, write in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
            note = "; ".join(failures) or None
            path.unlink(missing_ok=True)
            data_file.unlink(missing_ok=True)
            try:
                write(student, sample, seq, path, opset, external, _metadata(exporter, note))
            except Exception as exc:
                log.warning("%s ONNX export failed", exporter, exc_info=True)
                failures.append(f"{exporter} exporter failed: {_summary(exc)}")
                continue
            try:
                check = check_onnx(path, student, batch)
            except Exception as exc:
                log.warning("%s ONNX file does not run", exporter, exc_info=True)
                failures.append(f"{exporter} export does not run in onnxruntime: {_summary(exc)}")
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
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("distillery.")}


# --------------------------------------------------------------------------- safetensors


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _split_shared(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to save and ``{alias: saved name}`` for tied weights.

    safetensors refuses tensors that share memory. An exact alias (tied embeddings) is
    saved once and recorded; any other overlap is saved as an independent copy.
    """
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach().cpu()
        storage = t.untyped_storage().data_ptr()
        key = (storage, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        # A partial view or a second view of a storage already saved gets its own copy.
        independent = whole and t.is_contiguous() and storage not in storages
        storages.add(storage)
        tensors[name] = t if independent else t.clone(memory_format=torch.contiguous_format)
    return tensors, tied


def export_safetensors(
    student: nn.Module, path_weights: str | Path, path_config: str | Path
) -> tuple[Path, Path]:
    """Write ``student.safetensors`` (the state dict) and ``student_config.json``.

    The config is ``student.config`` plus ``format_version``, the weights file's
    name, size and sha256, and ``tied`` (alias -> saved name for shared weights), so
    :func:`load_student` can rebuild the architecture and check the weights.
    """
    from safetensors.torch import save_file

    path_weights, path_config = Path(path_weights), Path(path_config)
    config = getattr(student, "config", None)
    if not isinstance(config, dict):
        raise ExportFailed("the student has no .config dict to rebuild it from")
    tensors, tied = _split_shared(student.state_dict())
    save_file(
        tensors,
        str(path_weights),
        metadata={"format": "pt", "format_version": str(CONFIG_FORMAT_VERSION)},
    )
    saved = {
        **config,
        "format_version": CONFIG_FORMAT_VERSION,
        "weights": {
            "file": path_weights.name,
            "bytes": path_weights.stat().st_size,
            "sha256": sha256_file(path_weights),
        },
        "tied": tied,
    }
    path_config.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return path_weights, path_config


_SAVED_KEYS = ("format_version", "weights", "tied")


def load_student(weights: str | Path, config: str | Path | Mapping[str, Any]) -> nn.Module:
    """Rebuild the student from ``student_config.json`` and load its weights, in eval mode.

    Raises :class:`ExportFailed` when the weights file does not match the config's
    checksum or the state dict does not fit the rebuilt architecture.
    """
    from safetensors.torch import load_file

    from worker.engine import students

    saved: Mapping[str, Any] = (
        config if isinstance(config, Mapping) else json.loads(Path(config).read_text())
    )
    expected = (saved.get("weights") or {}).get("sha256")
    if expected and sha256_file(weights) != expected:
        raise ExportFailed(f"{Path(weights).name} does not match the sha256 in its config")
    module = students.rebuild_student({k: v for k, v in saved.items() if k not in _SAVED_KEYS})
    state = load_file(str(weights))
    for alias, name in (saved.get("tied") or {}).items():
        state[alias] = state[name]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportFailed(f"the weights do not fit the rebuilt student: {exc}") from None
    return module.eval()
