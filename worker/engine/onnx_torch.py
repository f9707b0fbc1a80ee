"""Our own ONNX -> PyTorch converter, for running ONNX teachers in torch.

We cannot use onnx2torch (it imports torchvision, which is not installable
here). :func:`convert` returns an :class:`OnnxGraphModule`: it holds the
graph's initializers as buffers and interprets the nodes in topological order
with torch ops, one converter per ``op_type`` from :data:`ONNX_OPS`. Shapes are
never baked in: ``Shape`` reads the live tensor, so a dynamic batch stays
dynamic. Shape arithmetic (``Shape`` outputs and small integer constants) stays
on the CPU, so a GPU model does not synchronise on every ``Reshape``.

An op without a converter (or from another domain, such as ``ai.onnx.ml``)
makes :func:`convert` raise :class:`ConversionError` listing them all; callers
fall back to onnxruntime, and must check a conversion against onnxruntime
before trusting it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor, nn

from worker.engine.archive import contained
from worker.engine.errors import TeacherInvalid
from worker.engine.onnx_graph import topological_order
from worker.engine.registry import Registry


class ConversionError(Exception):
    """The graph cannot be converted; ``unsupported`` lists the operators missing."""

    def __init__(self, message: str, unsupported: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.unsupported = list(unsupported)


@dataclass(frozen=True)
class NodeInfo:
    """What a converter knows about its node besides the input tensors."""

    op_type: str
    name: str
    attrs: dict[str, Any]
    num_outputs: int
    opset: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


OpConverter = Callable[[NodeInfo, list[Tensor | None]], Tensor | Sequence[Tensor]]

#: ONNX ``op_type`` (default domain) -> converter(node, inputs) -> output(s).
ONNX_OPS: Registry[OpConverter] = Registry("ONNX operator")

#: Inputs read as Python values (shapes, axes, pads): left where they are (the CPU).
_STATIC_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Expand": frozenset({1}),
    "Tile": frozenset({1}),
    "Split": frozenset({1}),
    "ConstantOfShape": frozenset({0}),
    "Range": frozenset({0, 1, 2}),
    "Pad": frozenset({1, 2, 3}),
    "ReduceMean": frozenset({1}),
    "ReduceSum": frozenset({1}),
    "ReduceMax": frozenset({1}),
    "ReduceMin": frozenset({1}),
    "ReduceProd": frozenset({1}),
    "ReduceL2": frozenset({1}),
    "ReduceSumSquare": frozenset({1}),
    "CumSum": frozenset({1}),
    "Trilu": frozenset({1}),
    "TopK": frozenset({1}),
    "Clip": frozenset({1, 2}),
}
_SMALL_CONSTANT = 1024
_DOMAINS = ("", "ai.onnx")

_TORCH_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type; :class:`ConversionError` if torch has none."""
    try:
        return _TORCH_DTYPES[elem_type]
    except KeyError:
        raise ConversionError(
            f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} has no torch dtype"
        ) from None


# --------------------------------------------------------------------------- tensors


def tensor_from_proto(tensor: onnx.TensorProto, base_dir: Path | None) -> Tensor:
    """A CPU tensor from a TensorProto, reading external data from inside ``base_dir`` only."""
    dtype = torch_dtype(tensor.data_type)
    dims = [int(d) for d in tensor.dims]
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        if base_dir is None:
            raise ConversionError(f"tensor {tensor.name!r} has external data and no folder")
        # contained() raises ArchiveUnsafe for a location that escapes the folder.
        path = contained(base_dir, info["location"])
        offset = int(info.get("offset", 0))
        itemsize = torch.empty((), dtype=dtype).element_size()
        length = int(info.get("length", math.prod(dims) * itemsize))
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(length)
        except OSError as exc:
            raise TeacherInvalid(
                f"cannot read external data for {tensor.name!r}: {exc}", field="teacher"
            ) from None
        if len(raw) != length:
            raise TeacherInvalid(
                f"external data for {tensor.name!r} is truncated ({info['location']})",
                field="teacher",
            )
        return _from_bytes(raw, dtype, dims)
    if tensor.raw_data:
        return _from_bytes(tensor.raw_data, dtype, dims)
    return torch.from_numpy(np.array(numpy_helper.to_array(tensor))).to(dtype).reshape(dims)


def _from_bytes(raw: bytes, dtype: torch.dtype, dims: list[int]) -> Tensor:
    if not raw:
        return torch.empty(dims, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(dims).clone()


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise ConversionError(f"{node.op_type} has a subgraph", [node.op_type])
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = tensor_from_proto(a.t, None)
            continue
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    return out


# --------------------------------------------------------------------------- the module


@dataclass
class _Step:
    fn: OpConverter
    info: NodeInfo
    inputs: list[str]
    outputs: list[str]
    static: frozenset[int]
    drop: list[str]  # values no later step reads


class OnnxGraphModule(nn.Module):
    """An ONNX graph run by torch ops; call it with the graph inputs, by position or name.

    Returns the single output, or a tuple in the graph's output order.
    :meth:`run` also returns intermediate tensors by name (for hint features).
    """

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None) -> None:
        super().__init__()
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in _DOMAINS), 1)
        self.output_names = [o.name for o in graph.output]
        self._buffer_of: dict[str, str] = {}
        # Small integer constants (shapes, axes) stay on the CPU, outside .to(device).
        self._static: dict[str, Tensor] = {}
        for tensor in graph.initializer:
            self._add_constant(tensor.name, tensor_from_proto(tensor, base_dir))
        initialized = set(self._buffer_of) | set(self._static)
        self.input_names = [i.name for i in graph.input if i.name not in initialized]

        nodes = _topological(graph, initialized | set(self.input_names))
        unsupported = sorted(
            {
                n.op_type if n.domain in _DOMAINS else f"{n.domain}::{n.op_type}"
                for n in nodes
                if n.domain not in _DOMAINS or n.op_type not in ONNX_OPS
            }
        )
        if unsupported:
            raise ConversionError(
                "unsupported ONNX operators: " + ", ".join(unsupported), unsupported
            )
        self._steps: list[_Step] = []
        for node in nodes:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                value = _constant_value(attrs)
                self._add_constant(node.output[0], value)
                continue
            info = NodeInfo(node.op_type, node.name, attrs, len(node.output), opset)
            self._steps.append(
                _Step(
                    ONNX_OPS.get(node.op_type),
                    info,
                    list(node.input),
                    list(node.output),
                    _STATIC_INPUTS.get(node.op_type, frozenset()),
                    [],
                )
            )
        keep = set(self.output_names)
        seen: set[str] = set()
        for step in reversed(self._steps):
            step.drop = [n for n in step.inputs if n and n not in seen and n not in keep]
            seen.update(step.inputs)
        self.value_names = [o for s in self._steps for o in s.outputs if o]

    def _add_constant(self, name: str, value: Tensor) -> None:
        if (not value.is_floating_point()) and value.numel() <= _SMALL_CONSTANT:
            self._static[name] = value
            return
        key = f"c{len(self._buffer_of)}"
        self.register_buffer(key, value)
        self._buffer_of[name] = key

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor | tuple[Tensor, ...]:
        feeds = dict(zip(self.input_names, args, strict=False))
        feeds.update(kwargs)
        values = self.run(feeds)
        outs = tuple(values[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def run(self, feeds: dict[str, Tensor], keep: Collection[str] = ()) -> dict[str, Tensor]:
        """Run the graph on ``feeds``; returns the outputs and the named values in ``keep``."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing graph inputs: {missing}")
        env: dict[str, Tensor | None] = dict(self._static)
        env.update({name: getattr(self, key) for name, key in self._buffer_of.items()})
        env.update(feeds)
        keep = set(keep)
        for step in self._steps:
            args = [env[n] if n else None for n in step.inputs]
            args = _align(args, step.static)
            result = step.fn(step.info, args)
            if isinstance(result, Tensor):
                result = (result,)
            for name, value in zip(step.outputs, result, strict=False):
                if name:
                    env[name] = value
            for name in step.drop:
                if name not in keep:
                    env.pop(name, None)
        out: dict[str, Tensor] = {}
        for name in [*self.output_names, *keep]:
            found = env.get(name)
            if found is None:
                raise KeyError(f"the graph has no value {name!r}")
            out[name] = found
        return out


def _align(args: list[Tensor | None], static: frozenset[int]) -> list[Tensor | None]:
    """Move CPU operands to the accelerator when a node mixes devices (shape inputs excepted)."""
    device = None
    for i, a in enumerate(args):
        if a is not None and i not in static and a.device.type != "cpu":
            device = a.device
            break
    if device is None:
        return args
    return [
        a.to(device) if a is not None and i not in static and a.device != device else a
        for i, a in enumerate(args)
    ]


def _topological(graph: onnx.GraphProto, available: set[str]) -> list[onnx.NodeProto]:
    """The nodes in an order where every input is computed before use.

    :class:`ConversionError` if a node reads a value nothing produces, and
    :class:`TeacherInvalid` naming the nodes of a cycle.
    """
    produced = set(available) | {""} | {o for n in graph.node for o in n.output}
    missing = sorted({i for n in graph.node for i in n.input if i not in produced})[:5]
    if missing:
        raise ConversionError(f"the graph reads values nothing produces: {missing}")
    return topological_order(graph)


def convert(model: onnx.ModelProto, base_dir: str | Path | None = None) -> OnnxGraphModule:
    """Convert ``model`` to a torch module (eval mode); external data is read from ``base_dir``.

    Raises :class:`ConversionError` listing every operator without a converter.
    """
    return OnnxGraphModule(model, Path(base_dir) if base_dir is not None else None).eval()


# --------------------------------------------------------------------------- helpers


def _ints(t: Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes_of(node: NodeInfo, ins: list[Tensor | None], index: int = 1) -> list[int] | None:
    """Axes from the attribute (older opsets) or the optional input (newer ones)."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(ins) > index and ins[index] is not None:
        return _ints(ins[index])
    return None


def _unary(fn: Callable[[Tensor], Tensor]) -> OpConverter:
    return lambda node, ins: fn(_t(ins[0]))


def _t(x: Tensor | None) -> Tensor:
    if x is None:
        raise ValueError("a required input is missing")
    return x


def _register(names: str, fn: OpConverter) -> None:
    for name in names.split():
        ONNX_OPS.register(name)(fn)


def _same_dtype(a: Tensor, b: Tensor) -> Tensor:
    return b if b.dtype == a.dtype else b.to(a.dtype)


# --------------------------------------------------------------------------- elementwise


def _div(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    a, b = _t(ins[0]), _t(ins[1])
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _mod(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    a, b = _t(ins[0]), _t(ins[1])
    return torch.fmod(a, b) if node.get("fmod", 0) else torch.remainder(a, b)


def _pow(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    base, exponent = _t(ins[0]), _t(ins[1])
    if exponent.is_floating_point() and base.is_floating_point():
        exponent = _same_dtype(base, exponent)
    return torch.pow(base, exponent).to(base.dtype)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def apply(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
        out = _t(ins[0])
        for x in ins[1:]:
            out = fn(out, _t(x))
        return out

    return apply


def _mean(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    return _variadic(torch.add)(node, ins) / len(ins)


_register("Identity", lambda node, ins: _t(ins[0]))
_register("Add", lambda node, ins: _t(ins[0]) + _t(ins[1]))
_register("Sub", lambda node, ins: _t(ins[0]) - _t(ins[1]))
_register("Mul", lambda node, ins: _t(ins[0]) * _t(ins[1]))
_register("Div", _div)
_register("Mod", _mod)
_register("Pow", _pow)
_register("Max", _variadic(torch.maximum))
_register("Min", _variadic(torch.minimum))
_register("Sum", _variadic(torch.add))
_register("Mean", _mean)
_register("Neg", _unary(torch.neg))
_register("Abs", _unary(torch.abs))
_register("Sqrt", _unary(torch.sqrt))
_register("Reciprocal", _unary(torch.reciprocal))
_register("Exp", _unary(torch.exp))
_register("Log", _unary(torch.log))
_register("Erf", _unary(torch.erf))
_register("Floor", _unary(torch.floor))
_register("Ceil", _unary(torch.ceil))
_register("Round", _unary(torch.round))
_register("Sign", _unary(torch.sign))
_register("Sin", _unary(torch.sin))
_register("Cos", _unary(torch.cos))
_register("Not", _unary(torch.logical_not))
_register("IsNaN", _unary(torch.isnan))
_register("And", lambda node, ins: torch.logical_and(_t(ins[0]), _t(ins[1])))
_register("Or", lambda node, ins: torch.logical_or(_t(ins[0]), _t(ins[1])))
_register("Xor", lambda node, ins: torch.logical_xor(_t(ins[0]), _t(ins[1])))
_register("Equal", lambda node, ins: torch.eq(_t(ins[0]), _t(ins[1])))
_register("Less", lambda node, ins: torch.lt(_t(ins[0]), _t(ins[1])))
_register("LessOrEqual", lambda node, ins: torch.le(_t(ins[0]), _t(ins[1])))
_register("Greater", lambda node, ins: torch.gt(_t(ins[0]), _t(ins[1])))
_register("GreaterOrEqual", lambda node, ins: torch.ge(_t(ins[0]), _t(ins[1])))
_register("Where", lambda node, ins: torch.where(_t(ins[0]), _t(ins[1]), _t(ins[2])))


# --------------------------------------------------------------------------- activations


def _gelu(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    return F.gelu(_t(ins[0]), approximate="tanh" if node.get("approximate") == "tanh" else "none")


def _leaky_relu(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    return F.leaky_relu(_t(ins[0]), float(node.get("alpha", 0.01)))


def _elu(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    return F.elu(_t(ins[0]), float(node.get("alpha", 1.0)))


def _selu(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    alpha = float(node.get("alpha", 1.67326319217681884765625))
    gamma = float(node.get("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def _hard_sigmoid(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    alpha, beta = float(node.get("alpha", 0.2)), float(node.get("beta", 0.5))
    return torch.clamp(alpha * _t(ins[0]) + beta, 0.0, 1.0)


def _prelu(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x, slope = _t(ins[0]), _t(ins[1])
    return torch.where(x < 0, x * slope, x)


def _softmax_like(fn: Callable[..., Tensor]) -> OpConverter:
    def apply(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
        x = _t(ins[0])
        if node.opset >= 13:
            return fn(x, dim=int(node.get("axis", -1)))
        # Before opset 13 the input is coerced to 2-D at ``axis`` (default 1).
        axis = _axis(int(node.get("axis", 1)), x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return apply


_register("Relu", _unary(torch.relu))
_register("Sigmoid", _unary(torch.sigmoid))
_register("Tanh", _unary(torch.tanh))
_register("Softplus", _unary(F.softplus))
_register("Softsign", _unary(F.softsign))
_register("HardSwish", _unary(F.hardswish))
_register("Mish", _unary(F.mish))
_register("Gelu", _gelu)
_register("LeakyRelu", _leaky_relu)
_register("Elu", _elu)
_register("Selu", _selu)
_register("HardSigmoid", _hard_sigmoid)
_register("PRelu", _prelu)
_register("Softmax", _softmax_like(torch.softmax))
_register("LogSoftmax", _softmax_like(torch.log_softmax))


# --------------------------------------------------------------------------- linear algebra


def _gemm(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    a, b = _t(ins[0]), _t(ins[1])
    c = ins[2] if len(ins) > 2 else None
    alpha, beta = float(node.get("alpha", 1.0)), float(node.get("beta", 1.0))
    if node.get("transA", 0):
        a = a.t()
    if node.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (c is None or c.dim() <= 1):
        return F.linear(a, b, c)
    if node.get("transB", 0):
        b = b.t()
    out = a @ b
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


_register("Gemm", _gemm)
_register("MatMul", lambda node, ins: torch.matmul(_t(ins[0]), _t(ins[1])))
_register("Einsum", lambda node, ins: torch.einsum(node.get("equation"), *[_t(x) for x in ins]))


# --------------------------------------------------------------------------- convolution


def _spatial_pads(node: NodeInfo, x: Tensor, kernel: list[int]) -> list[int]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, ...] including ``auto_pad``."""
    n = len(kernel)
    auto = node.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        strides = node.get("strides") or [1] * n
        dilations = node.get("dilations") or [1] * n
        begin, end = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - small if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * n)
    return list(node.get("pads") or [0] * (2 * n))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX begin/end pads to F.pad's last-dimension-first pairs."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


def _conv(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x, w = _t(ins[0]), _t(ins[1])
    b = ins[2] if len(ins) > 2 else None
    kernel = list(w.shape[2:])
    n = len(kernel)
    pads = _spatial_pads(node, x, kernel)
    padding: Any = pads[:n]
    if pads[:n] != pads[n:]:
        x = F.pad(x, _torch_pad(pads))
        padding = 0
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return fn(
        x,
        w,
        b,
        stride=node.get("strides") or 1,
        padding=padding,
        dilation=node.get("dilations") or 1,
        groups=int(node.get("group", 1)),
    )


def _conv_transpose(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x, w = _t(ins[0]), _t(ins[1])
    b = ins[2] if len(ins) > 2 else None
    n = w.dim() - 2
    if node.get("output_shape") or node.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ValueError("ConvTranspose with output_shape or auto_pad SAME is not converted")
    pads = list(node.get("pads") or [0] * (2 * n))
    if pads[:n] != pads[n:]:
        raise ValueError("ConvTranspose with asymmetric pads is not converted")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    return fn(
        x,
        w,
        b,
        stride=node.get("strides") or 1,
        padding=pads[:n],
        output_padding=node.get("output_padding") or 0,
        groups=int(node.get("group", 1)),
        dilation=node.get("dilations") or 1,
    )


def _max_pool(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    if node.num_outputs > 1:
        raise ValueError("MaxPool indices are not converted")
    kernel = list(node.get("kernel_shape"))
    n = len(kernel)
    pads = _spatial_pads(node, x, kernel)
    padding: Any = pads[:n]
    if pads[:n] != pads[n:] or any(p > k // 2 for p, k in zip(pads[:n], kernel, strict=True)):
        x = F.pad(x, _torch_pad(pads), value=-math.inf)
        padding = 0
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    return fn(
        x,
        kernel,
        stride=node.get("strides") or 1,
        padding=padding,
        dilation=node.get("dilations") or 1,
        ceil_mode=bool(node.get("ceil_mode", 0)),
    )


def _avg_pool(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    kernel = list(node.get("kernel_shape"))
    n = len(kernel)
    pads = _spatial_pads(node, x, kernel)
    if pads[:n] != pads[n:] or any(p > k // 2 for p, k in zip(pads[:n], kernel, strict=True)):
        raise ValueError("AveragePool with asymmetric or large pads is not converted")
    if any(d != 1 for d in node.get("dilations") or []):
        raise ValueError("AveragePool with dilations is not converted")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    return fn(
        x,
        kernel,
        stride=node.get("strides") or 1,
        padding=pads[:n],
        ceil_mode=bool(node.get("ceil_mode", 0)),
        count_include_pad=bool(node.get("count_include_pad", 0)),
    )


_register("Conv", _conv)
_register("ConvTranspose", _conv_transpose)
_register("MaxPool", _max_pool)
_register("AveragePool", _avg_pool)
_register(
    "GlobalAveragePool",
    lambda node, ins: _t(ins[0]).mean(dim=tuple(range(2, _t(ins[0]).dim())), keepdim=True),
)
_register(
    "GlobalMaxPool",
    lambda node, ins: _t(ins[0]).amax(dim=tuple(range(2, _t(ins[0]).dim())), keepdim=True),
)


# --------------------------------------------------------------------------- normalisation


def _batch_norm(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    if node.get("training_mode", 0) or node.num_outputs > 1:
        raise ValueError("BatchNormalization in training mode is not converted")
    x, scale, bias, mean, var = (_t(v) for v in ins[:5])
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(node.get("epsilon", 1e-5)))


def _layer_norm(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    if node.num_outputs > 1:
        raise ValueError("LayerNormalization mean/inv-std outputs are not converted")
    x, scale = _t(ins[0]), _t(ins[1])
    bias = ins[2] if len(ins) > 2 else None
    axis = _axis(int(node.get("axis", -1)), x.dim())
    eps = float(node.get("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps) * scale
    return out + bias if bias is not None else out


def _instance_norm(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x, scale, bias = _t(ins[0]), _t(ins[1]), _t(ins[2])
    return F.instance_norm(x, weight=scale, bias=bias, eps=float(node.get("epsilon", 1e-5)))


_register("BatchNormalization", _batch_norm)
_register("LayerNormalization", _layer_norm)
_register("InstanceNormalization", _instance_norm)
_register("Dropout", lambda node, ins: (_t(ins[0]), torch.ones_like(_t(ins[0]), dtype=torch.bool)))


# --------------------------------------------------------------------------- shapes


def _reshape(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    shape = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(node.get("shape"))
    if not node.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    axis = _axis(int(node.get("axis", 1)), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _transpose(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    perm = node.get("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


def _concat(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    tensors = [_t(x) for x in ins if x is not None]
    return torch.cat(tensors, dim=int(node.get("axis")))


def _split(node: NodeInfo, ins: list[Tensor | None]) -> tuple[Tensor, ...]:
    x = _t(ins[0])
    axis = int(node.get("axis", 0))
    sizes = node.get("split") or (_ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None)
    if not sizes:
        parts = int(node.get("num_outputs", node.num_outputs))
        size = x.shape[axis]
        # The last chunk is smaller when the axis does not divide evenly (opset 18).
        sizes = -(-size // parts)
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    if "starts" in node.attrs:
        starts, ends = list(node.get("starts")), list(node.get("ends"))
        axes = list(node.get("axes") or range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips: list[tuple[int, int, int, int]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, x.dim())
        if step > 0:
            # Python slices clamp out-of-range bounds exactly as ONNX specifies; bounds are
            # first brought into [-size, size] (INT64_MAX ends are common).
            size = x.shape[axis]
            index[axis] = slice(max(-size, min(start, size)), max(-size, min(end, size)), step)
        else:
            flips.append((axis, start, end, step))
    out = x[tuple(index)]
    for axis, start, end, step in flips:
        size = out.shape[axis]
        start = min(max(start + size if start < 0 else start, -1), size - 1)
        end = min(max(end + size if end < 0 else end, -1), size - 1)
        idx = torch.arange(start, end, step, device=out.device)
        out = out.index_select(axis, idx)
    return out


def _squeeze(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    axes = _axes_of(node, ins)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in axes))


def _unsqueeze(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    axes = _axes_of(node, ins) or []
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


def _gather(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    data, idx = _t(ins[0]), _t(ins[1]).long()
    axis = _axis(int(node.get("axis", 0)), data.dim())
    size = data.shape[axis]
    idx = torch.where(idx < 0, idx + size, idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))


def _gather_elements(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    data, idx = _t(ins[0]), _t(ins[1]).long()
    axis = _axis(int(node.get("axis", 0)), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


def _shape(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    dims = list(_t(ins[0]).shape)
    start = node.get("start", 0)
    end = node.get("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _cast(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    return _t(ins[0]).to(torch_dtype(int(node.get("to"))))


def _expand(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(ins[1])))
    return x.expand(shape)


def _tile(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    return _t(ins[0]).repeat(*_ints(ins[1]))


def _constant_value(attrs: dict[str, Any]) -> Tensor:
    if "value" in attrs:
        value: Tensor = attrs["value"]
        return value
    if "value_float" in attrs:
        return torch.tensor(float(attrs["value_float"]), dtype=torch.float32)
    if "value_floats" in attrs:
        return torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    if "value_int" in attrs:
        return torch.tensor(int(attrs["value_int"]), dtype=torch.int64)
    if "value_ints" in attrs:
        return torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    raise ValueError(f"Constant with {sorted(attrs)} is not converted")


def _constant_of_shape(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    value = node.get("value")
    fill = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
    return torch.full(_ints(ins[0]), fill.item(), dtype=fill.dtype)


def _range(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    start, limit, delta = (_t(v) for v in ins[:3])
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _pad(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    mode = node.get("mode", "constant")
    if "pads" in node.attrs:
        pads, value = list(node.get("pads")), float(node.get("value", 0.0))
        axes = list(range(x.dim()))
    else:
        pads = _ints(ins[1])
        value = float(ins[2].item()) if len(ins) > 2 and ins[2] is not None else 0.0
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    n = len(axes)
    for i, a in enumerate(axes):
        a = _axis(a, x.dim())
        full[a], full[a + x.dim()] = pads[i], pads[i + n]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}
    if mode not in torch_mode:
        raise ValueError(f"Pad mode {mode!r} is not converted")
    # Reflect/replicate padding in torch applies to the trailing (spatial) dimensions only.
    lead = next((i for i in range(x.dim()) if full[i] or full[i + x.dim()]), x.dim())
    torch_pads = _torch_pad(full[lead : x.dim()] + full[x.dim() + lead :])
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads, mode=torch_mode[mode])


_register("Reshape", _reshape)
_register("Flatten", _flatten)
_register("Transpose", _transpose)
_register("Concat", _concat)
_register("Split", _split)
_register("Slice", _slice)
_register("Squeeze", _squeeze)
_register("Unsqueeze", _unsqueeze)
_register("Gather", _gather)
_register("GatherElements", _gather_elements)
_register("Shape", _shape)
_register("Size", lambda node, ins: torch.tensor(_t(ins[0]).numel(), dtype=torch.int64))
_register("Cast", _cast)
_register("CastLike", lambda node, ins: _t(ins[0]).to(_t(ins[1]).dtype))
_register("Expand", _expand)
_register("Tile", _tile)
_register("Constant", lambda node, ins: _constant_value(node.attrs))
_register("ConstantOfShape", _constant_of_shape)
_register("Range", _range)
_register("Pad", _pad)


# --------------------------------------------------------------------------- reductions


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> OpConverter:
    def apply(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
        x = _t(ins[0])
        axes = _axes_of(node, ins)
        keep = bool(node.get("keepdims", 1))
        if not axes:
            if node.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, tuple(_axis(a, x.dim()) for a in axes), keep)

    return apply


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def _arg(fn: Callable[..., Tensor]) -> OpConverter:
    def apply(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
        x = _t(ins[0])
        axis = _axis(int(node.get("axis", 0)), x.dim())
        keep = bool(node.get("keepdims", 1))
        if node.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)

    return apply


def _cumsum(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    axis = _axis(_ints(ins[1])[0], x.dim())
    if node.get("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis)
    if node.get("exclusive", 0):
        out = out - x
    return out.flip(axis) if node.get("reverse", 0) else out


def _trilu(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    k = _ints(ins[1])[0] if len(ins) > 1 and ins[1] is not None else 0
    return torch.triu(x, k) if node.get("upper", 1) else torch.tril(x, k)


def _topk(node: NodeInfo, ins: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    x = _t(ins[0])
    values, indices = torch.topk(
        x,
        _ints(ins[1])[0],
        dim=int(node.get("axis", -1)),
        largest=bool(node.get("largest", 1)),
        sorted=True,
    )
    return values, indices


_register("ReduceMean", _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)))
_register("ReduceSum", _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)))
_register("ReduceMax", _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)))
_register("ReduceMin", _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)))
_register("ReduceProd", _reduce(_prod))
_register("ReduceL2", _reduce(lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k).sqrt()))
_register("ReduceSumSquare", _reduce(lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k)))
_register("ArgMax", _arg(torch.argmax))
_register("ArgMin", _arg(torch.argmin))
_register("CumSum", _cumsum)
_register("Trilu", _trilu)
_register("TopK", _topk)


def _clip(node: NodeInfo, ins: list[Tensor | None]) -> Tensor:
    x = _t(ins[0])
    if "min" in node.attrs or "max" in node.attrs:
        return torch.clamp(x, node.get("min"), node.get("max"))
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    return torch.clamp(
        x,
        lo.item() if lo is not None else None,
        hi.item() if hi is not None else None,
    )


_register("Clip", _clip)


def supported_ops() -> list[str]:
    """The ``op_type`` names :func:`convert` handles (default ONNX domain)."""
    return ONNX_OPS.names()
