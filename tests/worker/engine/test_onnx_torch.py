"""The ONNX -> torch converter, checked op by op and on exported models against onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from tests.worker.engine.factories import TeacherZoo, export_onnx, export_onnx_legacy, teacher_zoo
from worker.engine.errors import ArchiveUnsafe, TeacherInvalid
from worker.engine.onnx_torch import ONNX_OPS, ConversionError, convert

RNG = np.random.default_rng(0)
INT64_MAX = np.iinfo(np.int64).max


@pytest.fixture(scope="session")
def zoo() -> TeacherZoo:
    return teacher_zoo()


def _f(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _i(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], base_dir: Any = None
) -> list[np.ndarray]:
    module = convert(model, base_dir)
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs]


def _single_op(
    op: str,
    inputs: list[np.ndarray | None],
    constant: set[int],
    attrs: dict[str, Any],
    opset: int,
    outputs: int,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node graph: inputs in ``constant`` become initializers, None is an empty input."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i, value in enumerate(inputs):
        if value is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i in constant:
            inits.append(numpy_helper.from_array(value, name))
        else:
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, None))
            feeds[name] = value
    out_names = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op, names, out_names, **attrs)
    graph = helper.make_graph(
        [node],
        op,
        graph_inputs,
        [helper.make_empty_tensor_value_info(n) for n in out_names],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


def _case(
    op: str,
    inputs: list[np.ndarray | None],
    const: frozenset[int] | set[int] = frozenset(),
    opset: int = 17,
    outputs: int = 1,
    **attrs: Any,
) -> Any:
    """One single-node case; the inputs at positions ``const`` become initializers."""
    return pytest.param(op, inputs, set(const), attrs, opset, outputs, id=op)


_POOL: dict[str, Any] = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}

CASES = [
    _case("Gemm", [_f(3, 4), _f(5, 4), _f(5)], {1, 2}, transB=1),
    _case("Gemm", [_f(4, 3), _f(4, 5), _f(1, 5)], {1, 2}, transA=1, alpha=0.5, beta=2.0),
    _case("MatMul", [_f(2, 3, 4), _f(4, 5)], {1}),
    _case("Div", [_i(7, -7, 9), _i(2, 2, -4)]),
    _case("Mod", [_i(7, -7, 9), _i(3, 3, -4)]),
    _case("Mod", [_f(6), np.full(6, 0.7, np.float32)], fmod=1),
    _case("Pow", [np.abs(_f(2, 3)), np.array(2.0, np.float32)], {1}),
    _case("Max", [_f(2, 3), _f(3), _f(1, 3)]),
    _case("Sum", [_f(2, 3), _f(3), _f(1, 3)]),
    _case("Erf", [_f(4, 4)]),
    _case("Gelu", [_f(4, 4)], opset=20, approximate="tanh"),
    _case("LeakyRelu", [_f(4, 4)], alpha=0.2),
    _case("HardSigmoid", [_f(4, 4)]),
    _case("PRelu", [_f(2, 3, 4), np.full((3, 1), 0.1, np.float32)], {1}),
    _case("Selu", [_f(4, 4)]),
    _case("Softmax", [_f(2, 3, 4)], opset=11, axis=1),
    _case("Softmax", [_f(2, 3, 4)], axis=1),
    _case("LogSoftmax", [_f(2, 5)]),
    _case("Conv", [_f(2, 3, 9, 9), _f(4, 3, 3, 3), _f(4)], {1, 2}, pads=[1, 1, 1, 1]),
    _case("Conv", [_f(2, 3, 9, 9), _f(4, 3, 3, 3)], {1}, auto_pad="SAME_UPPER", strides=[2, 2]),
    _case("Conv", [_f(2, 4, 8, 8), _f(4, 2, 3, 3)], {1}, pads=[0, 1, 2, 1], group=2),
    _case("Conv", [_f(2, 3, 10), _f(4, 3, 3)], {1}, dilations=[2]),
    _case(
        "ConvTranspose",
        [_f(1, 3, 5, 5), _f(3, 2, 3, 3)],
        {1},
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        output_padding=[1, 1],
    ),
    _case("MaxPool", [_f(2, 3, 7, 7)], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    _case("MaxPool", [_f(2, 3, 8, 8)], kernel_shape=[2, 2], pads=[0, 0, 1, 1], strides=[2, 2]),
    _case("AveragePool", [_f(2, 3, 7, 7)], **_POOL),
    _case("AveragePool", [_f(2, 3, 7, 7)], **_POOL, count_include_pad=1),
    _case("GlobalAveragePool", [_f(2, 3, 5, 5)]),
    _case(
        "BatchNormalization",
        [_f(2, 3, 4, 4), _f(3), _f(3), _f(3), np.abs(_f(3)) + 0.1],
        {1, 2, 3, 4},
        opset=15,
        epsilon=1e-3,
    ),
    _case("LayerNormalization", [_f(2, 3, 4), _f(4), _f(4)], {1, 2}),
    _case("LayerNormalization", [_f(2, 3, 4), _f(3, 4)], {1}, axis=1),
    _case("InstanceNormalization", [_f(2, 3, 4, 4), _f(3), _f(3)], {1, 2}),
    _case("Flatten", [_f(2, 3, 4)], axis=0),
    _case("Flatten", [_f(2, 3, 4, 5)], axis=2),
    _case("Reshape", [_f(2, 3, 4), _i(0, -1)], {1}),
    _case("Reshape", [_f(2, 3, 4), _i(4, 0, 2)], {1}, allowzero=0),
    _case("Transpose", [_f(2, 3, 4)]),
    _case("Transpose", [_f(2, 3, 4)], perm=[1, 2, 0]),
    _case("Concat", [_f(2, 3), _f(2, 1)], axis=-1),
    _case("Split", [_f(7, 2)], opset=18, outputs=3, axis=0, num_outputs=3),
    _case("Split", [_f(2, 6), _i(1, 5)], {1}, opset=13, outputs=2, axis=1),
    _case("Split", [_f(2, 6)], opset=11, outputs=2, axis=1, split=[4, 2]),
    _case("Slice", [_f(5, 6), _i(1, -1), _i(INT64_MAX, -7), _i(0, 1), _i(2, -2)], {1, 2, 3, 4}),
    _case("Slice", [_f(5, 6), _i(-100), _i(100)], {1, 2}),
    _case("Slice", [_f(5, 6)], opset=9, starts=[1], ends=[3], axes=[1]),
    _case("Squeeze", [_f(1, 3, 1), _i(-1)], {1}),
    _case("Squeeze", [_f(1, 3, 1)]),
    _case("Squeeze", [_f(1, 3, 1)], opset=11, axes=[0]),
    _case("Unsqueeze", [_f(3, 4), _i(0, -1)], {1}),
    _case("Unsqueeze", [_f(3, 4)], opset=11, axes=[1]),
    _case("Gather", [_f(5, 4), _i(0, -1, 2)], {1}, axis=0),
    _case("Gather", [_f(5, 4), np.array(-2, np.int64)], {1}, axis=1),
    _case("GatherElements", [_f(3, 3), np.array([[0, 2], [1, -1], [2, 0]])], {1}, axis=1),
    _case("Shape", [_f(2, 3, 4)], start=1),
    _case("Shape", [_f(2, 3, 4)], end=-1),
    _case("Cast", [_f(3, 3) * 5], to=onnx.TensorProto.INT64),
    _case("ReduceMean", [_f(2, 3, 4), _i(1)], {1}, opset=18),
    _case("ReduceMean", [_f(2, 3, 4)], opset=13, axes=[-1], keepdims=0),
    _case("ReduceSum", [_f(2, 3, 4), _i(0, 2)], {1}, opset=13, keepdims=0),
    _case("ReduceSum", [_f(2, 3, 4)], opset=13),
    _case("ReduceMax", [_f(2, 3, 4), _i(1)], {1}, opset=18),
    _case("ReduceL2", [_f(2, 3, 4), _i(2)], {1}, opset=18),
    _case("Where", [_f(2, 3) > 0, _f(2, 3), _f(3)]),
    _case("Equal", [_i(1, 2, 3), _i(1, 0, 3)]),
    _case("Less", [_f(3), _f(3)]),
    _case("Expand", [_f(3, 1), _i(2, 1, 4)], {1}),
    _case("Clip", [_f(3, 4), np.array(-0.5, np.float32), np.array(0.5, np.float32)], {1, 2}),
    _case("Clip", [_f(3, 4), None, np.array(0.1, np.float32)], {2}),
    _case("Clip", [_f(3, 4)], opset=6, min=-0.2, max=0.3),
    _case("Dropout", [_f(3, 4)]),
    _case("Tile", [_f(2, 3), _i(2, 1)], {1}),
    _case(
        "ConstantOfShape", [_i(2, 3)], value=numpy_helper.from_array(np.array([1.5], np.float32))
    ),
    _case("Range", [np.array(1), np.array(10), np.array(3)]),
    _case("Pad", [_f(2, 3, 4, 4), _i(0, 0, 1, 2, 0, 0, 2, 1)], {1}, mode="reflect"),
    _case("Pad", [_f(2, 3), _i(1, 0, 0, 2), np.array(9.0, np.float32)], {1, 2}),
    _case("Pad", [_f(2, 3, 4), _i(1, 1), None, _i(2)], {1, 3}, opset=18, mode="edge"),
    _case("Einsum", [_f(2, 3, 4), _f(2, 4, 5)], equation="bij,bjk->bik"),
    _case("CumSum", [_f(3, 4), np.array(1)], {1}, exclusive=1, reverse=1),
    _case("Trilu", [_f(4, 4), np.array(1)], {1}, upper=0),
    _case("TopK", [_f(3, 6), _i(2)], {1}, outputs=2, axis=-1),
    _case("ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], axis=1, select_last_index=1),
    _case("Not", [_f(3) > 0]),
    _case("Sqrt", [np.abs(_f(3)) + 0.1]),
    _case("Reciprocal", [np.abs(_f(3)) + 0.1]),
]


@pytest.mark.parametrize(
    ("op", "inputs", "constant", "attrs", "opset", "outputs"),
    CASES,
)
def test_op_matches_onnxruntime(
    op: str,
    inputs: list[np.ndarray | None],
    constant: set[int],
    attrs: dict[str, Any],
    opset: int,
    outputs: int,
) -> None:
    model, feeds = _single_op(op, inputs, constant, attrs, opset, outputs)
    expected = _ort(model, feeds)
    got = _torch(model, feeds)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape, (op, g.shape, e.shape)
        assert g.dtype == e.dtype, (op, g.dtype, e.dtype)
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


def test_covers_what_the_exporters_write() -> None:
    needed = " ".join(
        [
            "Identity Constant Gemm MatMul Add Sub Mul Div Neg Pow Sqrt Reciprocal Exp Log Erf",
            "Relu LeakyRelu Sigmoid Tanh Gelu Softmax LogSoftmax Conv ConvTranspose MaxPool",
            "AveragePool GlobalAveragePool BatchNormalization LayerNormalization Flatten Reshape",
            "Transpose Concat Split Slice Squeeze Unsqueeze Gather Shape Cast ReduceMean ReduceSum",
            "ReduceMax Where Equal Expand Clip Dropout Max Min Abs Tile ConstantOfShape Range Sum",
            "Mod",
        ]
    ).split()
    assert not [op for op in needed if op not in ONNX_OPS]


# --------------------------------------------------------------------------- exported models


class _Encoder(nn.Module):
    """A small transformer classifier: attention reshapes read the batch from Shape ops."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.gelu(self.norm(self.layer(x))).mean(1))


def _check_model(path: Path, shape: tuple[int, ...]) -> None:
    model = onnx.load(path, load_external_data=False)
    module = convert(model, path.parent)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 7):
        x = RNG.normal(size=(batch, *shape)).astype(np.float32)
        expected = session.run(None, {name: x})[0]
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["mlp_dynamo", "mlp_legacy", "cnn_dynamo"])
def test_exported_nets_match_onnxruntime(zoo: TeacherZoo, which: str) -> None:
    shape = (1, 8, 8) if which.startswith("cnn") else (64,)
    _check_model(getattr(zoo, which), shape)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_transformer_keeps_a_dynamic_batch(tmp_path: Path, exporter: str) -> None:
    torch.manual_seed(0)
    encoder = _Encoder().eval()
    example = (torch.randn(2, 5, 16),)
    path = tmp_path / "encoder.onnx"
    if exporter == "legacy":
        export_onnx_legacy(encoder, example, path)
    else:
        export_onnx(encoder, example, path)
    _check_model(path, (5, 16))


def test_intermediate_values_by_name(zoo: TeacherZoo) -> None:
    model = onnx.load(zoo.mlp_legacy)
    module = convert(model)
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    x = torch.from_numpy(zoo.x[:4])
    values = module.run({module.input_names[0]: x}, keep=[relu])
    with torch.no_grad():
        hidden = zoo.mlp[1](zoo.mlp[0](x))
    torch.testing.assert_close(values[relu], hidden, atol=1e-5, rtol=1e-5)
    assert values["logits"].shape == (4, 10)
    # Initializers are buffers: they follow .to(device) and are never trained.
    assert not list(module.parameters()) and len(list(module.buffers())) >= 4


# --------------------------------------------------------------------------- refusals


def test_unsupported_ops_are_all_listed() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Hardmax", ["x"], ["a"]),
            helper.make_node("FastGelu", ["a"], ["b"], domain="com.microsoft"),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    with pytest.raises(ConversionError) as err:
        convert(model)
    assert err.value.unsupported == ["Hardmax", "com.microsoft::FastGelu"]
    assert "Hardmax" in str(err.value)


def test_a_cyclic_graph_is_refused_naming_its_nodes() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"], name="entry"),
            helper.make_node("Add", ["a", "c"], ["b"], name="add"),
            helper.make_node("Relu", ["b"], ["c"], name="back"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2, 3])],
    )
    with pytest.raises(TeacherInvalid, match="cycle through nodes 'add', 'back'"):
        convert(helper.make_model(graph))


def test_nodes_listed_out_of_order_still_run_in_order() -> None:
    graph = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
    )
    x = _f(2, 3)
    (got,) = _torch(helper.make_model(graph), {"x": x})
    np.testing.assert_allclose(got, -np.maximum(x, 0))


def test_external_data_must_stay_in_the_folder(zoo: TeacherZoo, tmp_path: Path) -> None:
    model = onnx.load(zoo.mlp_dynamo, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../" + entry.value
    inner = tmp_path / "inner"
    inner.mkdir()
    with pytest.raises(ArchiveUnsafe):
        convert(model, inner)
