"""Teacher runtimes: a frozen teacher that turns a batch into the outputs a student learns.

:func:`load_teacher` sniffs the file's content and dispatches through
:data:`TEACHER_RUNTIMES`: ``onnx`` (onnxruntime, or our torch conversion once
it has been checked against onnxruntime), ``safetensors`` (a built-in student
architecture rebuilt from its config) and ``huggingface`` (registered by
:mod:`worker.engine.hf.runtime`, which :mod:`worker.engine.components` imports).
Every runtime is frozen and returns float32 ``(N, D)`` on its device; nothing is
ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from worker.engine.archive import bundle_root, contained, extract, is_zip
from worker.engine.errors import (
    SpecInvalid,
    TeacherIncompatible,
    TeacherInvalid,
)
from worker.engine.inspection import (
    ML_DOMAIN,
    external_locations,
    extract_onnx_bundle,
    inspect,
    load_onnx,
    onnx_signature,
    sniff_teacher,
)
from worker.engine.layout import TO_CHANNELS_LAST, wants_channels_last
from worker.engine.onnx_torch import ConversionError, OnnxGraphModule, convert
from worker.engine.registry import Registry
from worker.engine.signature import TeacherSignature

Backend = Literal["torch", "onnxruntime"]
TeacherLoader = Callable[..., "TeacherRuntime"]
#: Asked while the teacher runs: the exception that must end the run now, or None to go on.
StopCheck = Callable[[], BaseException | None]

#: Seconds between two stop checks while one onnxruntime call runs.
STOP_POLL_S = 0.25

#: Teacher format ("onnx", "safetensors", "huggingface") -> loader(path, *, device, work_dir).
TEACHER_RUNTIMES: Registry[TeacherLoader] = Registry("teacher format")

#: Largest difference from onnxruntime, relative to the output's scale, that a torch
#: conversion may show. GPUs get more room: cuDNN convolutions use TF32 by default.
CONVERSION_TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}

#: Ops whose outputs make good hint features, searched back from the output.
_FEATURE_OPS = frozenset(
    {
        "Relu",
        "Gelu",
        "Tanh",
        "Sigmoid",
        "LeakyRelu",
        "Elu",
        "Selu",
        "HardSwish",
        "Mish",
        "Softplus",
        "Gemm",
        "MatMul",
        "LayerNormalization",
        "BatchNormalization",
        "GlobalAveragePool",
        "MaxPool",
        "AveragePool",
        "Flatten",
        "ReduceMean",
        "Conv",
    }
)
# Ops between the last linear layer and the output that carry no features of their own.
_HEAD_PASSTHROUGH = frozenset(
    {"Softmax", "LogSoftmax", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
)
_MAX_HINT_LAYERS = 4
_SAVED_CONFIG_KEYS = ("format_version", "weights", "tied")


class TeacherRuntime(ABC):
    """A frozen teacher. ``predict`` returns float32 ``(N, D)`` on ``device``, never softmaxed."""

    signature: TeacherSignature
    backend: Backend = "torch"
    #: Why this backend was chosen (ONNX teachers say whether the torch conversion was used).
    backend_reason: str = ""
    module: nn.Module | None = None
    tokenizer: Any | None = None
    digest: str = ""
    device: torch.device = torch.device("cpu")
    #: While set, a runtime that can interrupt one long call asks it (see :meth:`stoppable`).
    stop_check: StopCheck | None = None

    @contextmanager
    def stoppable(self, check: StopCheck) -> Iterator[None]:
        """Within this block, a single long call into the teacher ends once ``check`` names why.

        Runtimes that cannot interrupt a call (torch) are checked between calls by the caller.
        """
        previous, self.stop_check = self.stop_check, check
        try:
            yield
        finally:
            self.stop_check = previous

    @abstractmethod
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """The signature's ``output`` for ``batch``: float32 (N, D) on ``device``."""

    def hint_layers(self) -> list[str]:
        """Candidate intermediate layers for hint losses, best first ([] when none)."""
        return []

    def predict_with_features(self, batch: dict[str, Tensor], layer: str) -> tuple[Tensor, Tensor]:
        """``(outputs, features of layer flattened to (N, F))``."""
        raise TeacherIncompatible(
            f"this {self.signature.format} teacher exposes no intermediate layers",
            field="method.hint_layer",
        )

    def prepare(self, probe: dict[str, Tensor]) -> None:  # noqa: B027 (optional hook)
        """Called once with a few real input rows before the teacher runs over the data."""


def load_teacher(path: str | Path, *, device: torch.device | str, work_dir: Path) -> TeacherRuntime:
    """Load the teacher at ``path`` (format sniffed from content) as a frozen runtime.

    ``work_dir`` receives extracted bundles. Raises :class:`UnsupportedFormat`
    for pickle-based or unknown files and :class:`TeacherInvalid` for malformed ones.
    """
    fmt = sniff_teacher(path)
    loader = TEACHER_RUNTIMES.get(fmt, field="teacher")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return loader(Path(path), device=torch.device(device), work_dir=work_dir)


def file_digest(paths: Iterable[Path]) -> str:
    """sha256 over the files' contents, in order."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def _bundle_files(path: Path, work_dir: Path, name: str) -> Path:
    """The bundle's root folder: a zip extracted safely into ``work_dir / name``, or a folder."""
    if path.is_dir():
        return bundle_root(path)
    return bundle_root(extract(path, _fresh(work_dir / name)))


def teacher_digest(path: Path) -> str:
    """sha256 of the teacher file, or of a folder's files (relative names and contents)."""
    if path.is_file():
        return file_digest([path])
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        h.update(file_digest([p]).encode())
    return h.hexdigest()


def _as_output(out: Tensor, device: torch.device) -> Tensor:
    out = out.float()
    if out.dim() != 2:
        out = out.reshape(out.shape[0], -1)
    return out.to(device)


def _flat_features(features: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """(N, F) features; token states of text models are averaged over the attention mask."""
    mask = batch.get("attention_mask")
    if features.dim() == 3 and mask is not None and mask.shape == features.shape[:2]:
        m = mask.to(features.dtype).unsqueeze(-1)
        return ((features * m).sum(1) / m.sum(1).clamp_min(1.0)).float()
    return features.reshape(features.shape[0], -1).float()


# --------------------------------------------------------------------------- ONNX


def _np_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype("float32")


class OnnxTeacher(TeacherRuntime):
    """An ONNX graph run by onnxruntime, or by its torch conversion once :meth:`prepare` checked it.

    scikit-learn graphs (``ai.onnx.ml``) always run in onnxruntime. For a ZipMap
    classifier, the tensor that feeds the ZipMap is read instead of the maps.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        graph_path: Path,
        signature: TeacherSignature,
        digest: str,
        device: torch.device,
        work_dir: Path,
    ) -> None:
        self._model = model
        self._graph_path = graph_path
        self._graph_dir = graph_path.parent
        self._work_dir = work_dir
        self.signature = signature
        self.digest = digest
        self.device = device
        self.backend = "onnxruntime"
        self.backend_reason = "not prepared yet: onnxruntime until the torch conversion is checked"
        self.module = None
        self._graph_module: OnnxGraphModule | None = None
        self.tokenizer = None
        self._prepared = False
        self._inputs = signature.inputs
        zipmap = signature.extra.get("zipmap")
        # The tensor learnt from: a ZipMap's input rather than its sequence of maps.
        self._output = zipmap["tensor"] if zipmap else str(signature.output)
        self._fixed_batch = signature.extra.get("fixed_batch") == 1
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._tensor_names = {o for n in model.graph.node for o in n.output if o}
        self._session([self._output])

    @property
    def graph_path(self) -> Path:
        """The ONNX graph file (external data beside it), for running the file itself."""
        return self._graph_path

    # ---------------------------------------------------------------- onnxruntime

    def _providers(self) -> list[str]:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        return providers

    def _session(self, outputs: list[str]) -> Any:
        """An onnxruntime session with graph outputs ``outputs`` (on a rewritten copy if needed)."""
        key = tuple(outputs)
        if key in self._sessions:
            return self._sessions[key]
        import onnxruntime as ort

        declared = [o.name for o in self._model.graph.output]
        source: str | bytes = str(self._graph_path)
        if not set(outputs) <= set(declared):
            source = self._variant(outputs)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(source, options, providers=self._providers())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise TeacherInvalid(
                f"onnxruntime cannot load the ONNX graph: {exc}", field="teacher"
            ) from None
        self._sessions[key] = session
        return session

    def _variant(self, outputs: list[str]) -> str | bytes:
        """A copy of the graph whose outputs are ``outputs``; written beside its external data."""
        model = onnx.ModelProto()
        model.CopyFrom(self._model)
        graph = model.graph
        if self.signature.extra.get("zipmap"):
            keep = [n for n in graph.node if n.op_type != "ZipMap" or n.domain != ML_DOMAIN]
            del graph.node[:]
            graph.node.extend(keep)
        del graph.output[:]
        for name in outputs:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        if not external_locations(model):
            return model.SerializeToString()
        # External data resolves relative to the graph file, so the copy must sit beside it.
        folder = self._graph_dir
        if not folder.resolve().is_relative_to(self._work_dir.resolve()):
            folder = self._copy_to_work_dir()
        tag = hashlib.sha256("|".join(outputs).encode()).hexdigest()[:12]
        path = folder / f"variant-{tag}.onnx"
        path.write_bytes(model.SerializeToString())
        return str(path)

    def _copy_to_work_dir(self) -> Path:
        """A folder in ``work_dir`` holding copies of the external data files."""
        folder = self._work_dir / "onnx-variants"
        if folder.is_dir():
            return folder
        folder.mkdir(parents=True)
        for location in external_locations(self._model):
            target = contained(folder, location)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(contained(self._graph_dir, location), target)
        return folder

    def _feeds(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Batch tensors keyed by graph input, reshaped to the declared rank where needed."""
        feeds: dict[str, Tensor] = {}
        for spec in self._inputs:
            if spec.name in batch:
                x = batch[spec.name]
            elif len(self._inputs) == 1 and "inputs" in batch:
                x = batch["inputs"]
            elif len(self._inputs) == 1 and len(batch) == 1:
                x = next(iter(batch.values()))
            elif spec.name == "token_type_ids" and "input_ids" in batch:
                x = torch.zeros_like(batch["input_ids"])
            else:
                raise TeacherIncompatible(
                    f"the teacher's input {spec.name!r} is not in the batch ({', '.join(batch)})",
                    field="dataset_id",
                )
            if wants_channels_last(tuple(x.shape), spec.shape[1:]):
                x = x.permute(*TO_CHANNELS_LAST).contiguous()
            feeds[spec.name] = _to_declared_rank(x, spec.shape[1:])
        return feeds

    def _ort_run(self, batch: dict[str, Tensor], outputs: list[str]) -> list[Tensor]:
        session = self._session(outputs)
        feeds = {
            name: x.detach().cpu().numpy().astype(_np_dtype(spec.dtype), copy=False)
            for (name, x), spec in zip(self._feeds(batch).items(), self._inputs, strict=True)
        }
        rows = [feeds] if not self._fixed_batch else _rows(feeds)
        with _RunWatch(self.stop_check) as watch:
            try:
                parts = [session.run(outputs, f, watch.options) for f in rows]
            except Exception:
                if watch.reason is not None:
                    raise watch.reason from None
                raise
        return [
            torch.from_numpy(np.ascontiguousarray(np.concatenate([p[i] for p in parts])))
            for i in range(len(outputs))
        ]

    # ---------------------------------------------------------------- torch

    def _torch_run(self, batch: dict[str, Tensor], keep: list[str]) -> dict[str, Tensor]:
        module = self._graph_module
        assert module is not None
        feeds = {
            name: x.to(self.device, dtype=_torch_dtype(spec.dtype))
            for (name, x), spec in zip(self._feeds(batch).items(), self._inputs, strict=True)
        }
        rows = [feeds] if not self._fixed_batch else _rows(feeds)
        parts = [module.run(f, keep=keep) for f in rows]
        return {k: torch.cat([p[k] for p in parts]) for k in [self._output, *keep]}

    def prepare(self, probe: dict[str, Tensor]) -> None:
        """Convert to torch and keep the conversion only if it matches onnxruntime on ``probe``.

        The probe runs at batch size 1 and at its full size; any failure or a
        difference over :data:`CONVERSION_TOLERANCE` keeps onnxruntime, and
        ``backend_reason`` says why.
        """
        if self._prepared:
            return
        self._prepared = True
        if self.signature.extra.get("sklearn"):
            self.backend_reason = "scikit-learn operators (ai.onnx.ml) run in onnxruntime"
            return
        rows = len(next(iter(probe.values()))) if probe else 0
        if rows == 0:
            self.backend_reason = "no probe rows to check a torch conversion; using onnxruntime"
            return
        try:
            module = convert(self._model, self._graph_dir)
        except ConversionError as exc:
            self.backend_reason = f"torch conversion failed ({exc}); using onnxruntime"
            return
        except Exception as exc:  # a converter bug must not stop a teacher onnxruntime can run
            self.backend_reason = (
                f"torch conversion failed ({type(exc).__name__}: {exc}); using onnxruntime"
            )
            return
        module.to(self.device).requires_grad_(False)
        self.module = self._graph_module = module
        self.backend = "torch"
        problem = self._check_conversion(probe, rows)
        if problem:
            self.module = self._graph_module = None
            self.backend = "onnxruntime"
            self.backend_reason = f"{problem}; using onnxruntime"
            return
        self.backend_reason = (
            f"converted to torch; matches onnxruntime on {rows} probe rows "
            f"(batch sizes 1 and {rows})"
        )
        # The torch module replaces the main session; hint variants are rebuilt on demand.
        self._sessions.clear()

    def _check_conversion(self, probe: dict[str, Tensor], rows: int) -> str | None:
        tolerance = CONVERSION_TOLERANCE.get(self.device.type, 1e-3)
        for size in sorted({1, rows}):
            part = {k: v[:size] for k, v in probe.items()}
            reference = self._ort_run(part, [self._output])[0].double()
            try:
                with torch.no_grad():
                    got = self._torch_run(part, [])[self._output].detach().cpu().double()
            except Exception as exc:  # any failure of the converted graph means: do not use it
                return f"the torch conversion fails on a probe batch of {size} ({exc})"
            if got.shape != reference.shape:
                return (
                    f"the torch conversion gives shape {tuple(got.shape)} where onnxruntime "
                    f"gives {tuple(reference.shape)} (batch {size})"
                )
            if not reference.numel():
                continue
            # NaN where onnxruntime also gives NaN (missing inputs) is agreement, not a mismatch.
            both_nan = reference.isnan() & got.isnan()
            finite = reference[~reference.isnan()].abs()
            scale = max(1.0, float(finite.max())) if finite.numel() else 1.0
            diff = float(torch.where(both_nan, 0.0, (got - reference).abs()).max())
            if not np.isfinite(diff) or diff > tolerance * scale:
                return (
                    f"the torch conversion disagrees with onnxruntime by {diff:.3g} "
                    f"(tolerance {tolerance * scale:.3g}, batch {size})"
                )
        return None

    # ---------------------------------------------------------------- the runtime API

    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """The learnt output (probabilities, logits or values), float32 (N, D)."""
        with torch.no_grad():
            if self.backend == "torch":
                out = self._torch_run(batch, [])[self._output]
            else:
                out = self._ort_run(batch, [self._output])[0]
        return _as_output(out, self.device)

    def hint_layers(self) -> list[str]:
        """Outputs of the last few feature-producing nodes before the final layer, last first."""
        if self.signature.extra.get("sklearn"):
            return []
        return onnx_hint_layers(self._model, self._output)

    def predict_with_features(self, batch: dict[str, Tensor], layer: str) -> tuple[Tensor, Tensor]:
        """Outputs and the intermediate tensor ``layer`` (a graph value name), flattened."""
        if self.signature.extra.get("sklearn") or layer not in self._tensor_names:
            candidates = ", ".join(self.hint_layers()) or "none"
            raise TeacherIncompatible(
                f"the ONNX teacher has no intermediate tensor {layer!r}; candidates: {candidates}",
                field="method.hint_layer",
            )
        with torch.no_grad():
            if self.backend == "torch":
                values = self._torch_run(batch, [layer])
                out, features = values[self._output], values[layer]
            else:
                out, features = self._ort_run(batch, [self._output, layer])
        return _as_output(out, self.device), _flat_features(features.to(self.device), batch)


class _RunWatch:
    """Sets onnxruntime's ``terminate`` flag from a thread once the stop check names a reason.

    A graph can loop for ever inside one ``session.run`` (a ``Loop`` of 2**62
    trips): only onnxruntime's own flag, set from another thread, ends that call.
    """

    def __init__(self, check: StopCheck | None) -> None:
        import onnxruntime as ort

        self.options = ort.RunOptions()
        self.reason: BaseException | None = None
        self._check = check
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _RunWatch:
        if self._check is not None:
            self._thread = threading.Thread(target=self._watch, name="teacher-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        assert self._check is not None
        while not self._done.wait(STOP_POLL_S):
            reason = self._check()
            if reason is not None:
                self.reason = reason
                self.options.terminate = True
                return


def _to_declared_rank(x: Tensor, declared: list[Any]) -> Tensor:
    """``x`` reshaped to the graph's per-sample shape when only the rank differs (flat vs image)."""
    dims = [d for d in declared if isinstance(d, int) and d > 0]
    known = bool(declared) and len(dims) == len(declared)
    if known and len(dims) != x.dim() - 1 and math.prod(dims) == math.prod(x.shape[1:]):
        return x.reshape(x.shape[0], *dims)
    return x


def _rows(feeds: dict[str, Any]) -> list[dict[str, Any]]:
    """One feed per sample, for graphs whose batch dimension is fixed at 1."""
    n = len(next(iter(feeds.values())))
    return [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def onnx_hint_layers(model: onnx.ModelProto, output: str) -> list[str]:
    """Candidate feature tensors of a graph: outputs of the last feature ops before the head."""
    producers = {o: n for n in model.graph.node for o in n.output if o}
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    # The head: the output back through pass-through ops to the last linear layer (and its bias).
    head: set[str] = set()
    name = output
    node = producers.get(name)
    while node is not None and node.op_type in _HEAD_PASSTHROUGH and node.input:
        head.add(name)
        name = node.input[0]
        node = producers.get(name)
    if node is not None and node.op_type == "Add":
        head.add(name)
        name = next((i for i in node.input if i not in constants), node.input[0])
        node = producers.get(name)
    if node is not None and node.op_type in ("Gemm", "MatMul"):
        head.add(name)
    ancestors: set[str] = set()
    stack = [output]
    while stack:
        current = producers.get(stack.pop())
        if current is None:
            continue
        for i in current.input:
            if i and i not in ancestors:
                ancestors.add(i)
                stack.append(i)
    candidates = [
        n.output[0]
        for n in model.graph.node
        if n.op_type in _FEATURE_OPS
        and n.output
        and n.output[0] in ancestors
        and n.output[0] not in head
    ]
    return list(reversed(candidates))[:_MAX_HINT_LAYERS]


@TEACHER_RUNTIMES.register("onnx")
def load_onnx_teacher(path: Path, *, device: torch.device, work_dir: Path) -> OnnxTeacher:
    """An ONNX graph, or a zip of a graph and its external data (extracted into ``work_dir``)."""
    path = Path(path)
    if path.is_file() and is_zip(path):
        # The graph and the external data it references; nothing else reaches the disk.
        extracted = extract_onnx_bundle(path, _fresh(work_dir / "onnx"))
        root, graph_path = extracted.root, extracted.graph
    elif path.is_dir():
        root = _bundle_files(path, work_dir, "onnx")
        graphs = sorted(root.rglob("*.onnx"))
        if len(graphs) != 1:
            raise TeacherInvalid(
                f"the bundle must hold exactly one .onnx graph; found {len(graphs)}",
                field="teacher",
            )
        graph_path = graphs[0]
    else:
        root, graph_path = path.parent, path
    model = load_onnx(graph_path, expected=graph_path != path)
    files = [graph_path]
    folder = graph_path.parent.relative_to(root)
    for location in external_locations(model):
        # Relative to the graph, and never outside the bundle (or the graph's folder).
        target = contained(root, str(folder / location))
        if not target.is_file():
            raise TeacherInvalid(
                f"the graph's external data {location!r} is missing", field="teacher"
            )
        files.append(target)
    size = sum(f.stat().st_size for f in files)
    signature = onnx_signature(model, size)
    if signature.output is None:
        raise TeacherIncompatible(
            "the ONNX graph has no float output to learn from", field="teacher"
        )
    # A zip is hashed as uploaded; a plain graph together with its external data.
    digest = teacher_digest(path) if path.is_dir() or is_zip(path) else file_digest(files)
    return OnnxTeacher(model, graph_path, signature, digest, device, work_dir)


# --------------------------------------------------------------------------- safetensors


class SafetensorsTeacher(TeacherRuntime):
    """A built-in architecture (mlp, cnn, rnn, transformer) rebuilt from its config."""

    def __init__(
        self, module: nn.Module, signature: TeacherSignature, digest: str, device: torch.device
    ) -> None:
        self.module = module.to(device)
        self.signature = signature
        self.digest = digest
        self.device = device
        self.backend = "torch"
        self.backend_reason = "safetensors weights in the rebuilt architecture"
        self.tokenizer = None
        self._input_names = [t.name for t in signature.inputs]

    def _inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [n for n in self._input_names if n not in batch]
        if missing:
            raise TeacherIncompatible(
                f"the teacher needs inputs {missing}; the batch has {list(batch)}",
                field="dataset_id",
            )
        return {n: batch[n].to(self.device) for n in self._input_names}

    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """The rebuilt model's output, float32 (N, D)."""
        assert self.module is not None
        with torch.no_grad():
            return _as_output(self.module(**self._inputs(batch)), self.device)

    def hint_layers(self) -> list[str]:
        """The architecture's penultimate-feature module (``hint_layer``), if it names one."""
        layer = getattr(self.module, "hint_layer", None)
        return [layer] if isinstance(layer, str) and layer else []

    def predict_with_features(self, batch: dict[str, Tensor], layer: str) -> tuple[Tensor, Tensor]:
        """Outputs and ``layer``'s output (a dotted module name), flattened to (N, F)."""
        assert self.module is not None
        try:
            target = self.module.get_submodule(layer)
        except AttributeError:
            raise TeacherIncompatible(
                f"the teacher has no layer {layer!r}; candidates: {self.hint_layers()}",
                field="method.hint_layer",
            ) from None
        captured: list[Tensor] = []

        def keep(_module: nn.Module, _args: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)

        inputs = self._inputs(batch)
        handle = target.register_forward_hook(keep)
        try:
            with torch.no_grad():
                out = self.module(**inputs)
        finally:
            handle.remove()
        return _as_output(out, self.device), _flat_features(captured[-1], inputs)


@TEACHER_RUNTIMES.register("safetensors")
def load_safetensors_teacher(
    path: Path, *, device: torch.device, work_dir: Path
) -> SafetensorsTeacher:
    """A zip of ``*.safetensors`` weights and the config.json that rebuilds the architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from worker.engine.students import rebuild_student

    path = Path(path)
    signature = inspect(path)
    root = _bundle_files(path, work_dir, "safetensors")
    config_path = contained(root, str(signature.extra["config"]))
    weights_path = contained(root, str(signature.extra["weights"]))
    config = json.loads(config_path.read_text())
    expected = (config.get("weights") or {}).get("sha256")
    if expected and file_digest([weights_path]) != expected:
        raise TeacherInvalid(
            f"{weights_path.name} does not match the sha256 in {config_path.name}",
            field="teacher",
        )
    try:
        module = rebuild_student({k: v for k, v in config.items() if k not in _SAVED_CONFIG_KEYS})
    except (SpecInvalid, KeyError, TypeError, ValueError) as exc:
        raise TeacherInvalid(
            f"{config_path.name} does not rebuild an architecture: {exc}", field="teacher"
        ) from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TeacherInvalid(f"cannot read {weights_path.name}: {exc}", field="teacher") from None
    for alias, name in (config.get("tied") or {}).items():
        if name in state:
            state[alias] = state[name]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TeacherInvalid(
            f"the weights do not match {config_path.name}: {exc}", field="teacher"
        ) from None
    module.eval().requires_grad_(False)
    return SafetensorsTeacher(module, signature, teacher_digest(path), device)
