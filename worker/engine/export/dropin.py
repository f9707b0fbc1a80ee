"""``student.onnx`` as a drop-in for an ONNX teacher, and the parity check that proves it.

:func:`make_dropin` rewrites the exported student graph so that it takes what the
teacher takes and gives what the teacher gives: the teacher's input names, dtypes
(a Cast inside the graph) and batch axis; the teacher's outputs, in its order, with
the same meaning: probabilities (a Softmax over the student's logits) where the
teacher gives probabilities, logits or values as they are, a label output (ArgMax,
then Gather on the teacher's class labels where they are not the class indices) and a
ZipMap where a scikit-learn teacher has them. :func:`parity` runs teacher and student
in onnxruntime on one feed dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.errors import ExportFailed
from worker.engine.layout import (
    TO_CHANNELS_FIRST,
    TO_CHANNELS_LAST,
    channels_first_dims,
    channels_last,
    wants_channels_last,
)
from worker.engine.signature import TeacherSignature

ML_DOMAIN = "ai.onnx.ml"
_CLASSIFIER_OPS = ("TreeEnsembleClassifier", "LinearClassifier", "SVMClassifier")
#: Internal student names that collide with a teacher name get this suffix.
_RENAMED = "__student"


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def class_labels(teacher: onnx.ModelProto) -> np.ndarray | None:
    """The class labels of a scikit-learn classifier graph (int64 or str), in output order."""
    for node in teacher.graph.node:
        if node.domain != ML_DOMAIN or node.op_type not in (*_CLASSIFIER_OPS, "ZipMap"):
            continue
        ints = _attribute(node, "classlabels_int64s") or _attribute(node, "classlabels_ints")
        if ints:
            return np.asarray(ints, dtype=np.int64)
        strings = _attribute(node, "classlabels_strings")
        if strings:
            return np.asarray([s.decode() for s in strings], dtype=object)
    return None


def _zipmap_node(teacher: onnx.ModelProto) -> onnx.NodeProto | None:
    return next(
        (n for n in teacher.graph.node if n.domain == ML_DOMAIN and n.op_type == "ZipMap"), None
    )


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the value ``old`` to ``new`` in nodes, initializers, value infos and graph io."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for collection in (graph.initializer, graph.value_info, graph.input, graph.output):
        for item in collection:
            if item.name == old:
                item.name = new


def _free_teacher_names(graph: onnx.GraphProto, names: set[str]) -> None:
    """Move internal student values out of the way of the teacher's input and output names."""
    used = {name for node in graph.node for name in (*node.input, *node.output)}
    used |= {t.name for t in graph.initializer} | {v.name for v in graph.value_info}
    used |= {v.name for v in (*graph.input, *graph.output)}
    for name in sorted(names & used):
        _rename_everywhere(graph, name, name + _RENAMED)


def _batch_first(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy of ``value`` whose first dimension is the dynamic ``batch`` unless named already."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    if copy.type.HasField("tensor_type") and copy.type.tensor_type.shape.dim:
        first = copy.type.tensor_type.shape.dim[0]
        if not first.dim_param:
            first.Clear()
            first.dim_param = "batch"
    return copy


def _elem_type(value: onnx.ValueInfoProto) -> int:
    return int(value.type.tensor_type.elem_type) if value.type.HasField("tensor_type") else 0


def _sample_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """The per-sample dimensions of a tensor value: ints where fixed, None where not."""
    dims = value.type.tensor_type.shape.dim[1:]
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed, not initializers listed as inputs (older exporters do that)."""
    constants = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in constants]


def _wire_inputs(
    graph: onnx.GraphProto, teacher_inputs: list[onnx.ValueInfoProto]
) -> list[onnx.NodeProto]:
    """Make the teacher's inputs the graph's; each feeds the student input it matches.

    A teacher input the student does not read (e.g. ``token_type_ids``) stays an input
    of the graph, unused, so the teacher's feed dict is accepted as it is.
    """
    student_inputs = {v.name: v for v in graph.input}
    nodes = []
    for value in teacher_inputs:
        target = student_inputs.get(value.name + _RENAMED)
        if target is None and len(teacher_inputs) == 1 and len(student_inputs) == 1:
            target = next(iter(student_inputs.values()))
        if target is None:
            continue
        wanted = _elem_type(target)
        teacher_dims, student_dims = _sample_dims(value), _sample_dims(target)
        # Channels-last images (a tf2onnx graph's) reach the student channels-first, as the
        # engine held them in training (flattened in that order too, for a flat student).
        transposed = channels_last(teacher_dims)
        given = channels_first_dims(teacher_dims) if transposed else teacher_dims
        reshaped = given != student_dims and None not in student_dims
        steps = [f"dropin_{value.name}_cast", f"dropin_{value.name}_channels_first"]
        names = [*steps[: int(transposed) + int(reshaped)], target.name]
        if _elem_type(value) != wanted:
            nodes.append(helper.make_node("Cast", [value.name], [names[0]], to=wanted))
        else:
            nodes.append(helper.make_node("Identity", [value.name], [names[0]]))
        if transposed:
            perm = list(TO_CHANNELS_FIRST)
            nodes.append(helper.make_node("Transpose", [names[0]], [names[1]], perm=perm))
        if reshaped:
            # The teacher declares another per-sample shape of the same values (image vs flat).
            shape = numpy_helper.from_array(
                np.array([-1, *_sample_dims(target)], dtype=np.int64), f"dropin_{value.name}_shape"
            )
            graph.initializer.append(shape)
            nodes.append(helper.make_node("Reshape", [names[-2], shape.name], [target.name]))
    del graph.input[:]
    graph.input.extend(_batch_first(value) for value in teacher_inputs)
    return nodes


def _output_node(
    value: onnx.ValueInfoProto, source: str, learned_dtype: int = TensorProto.FLOAT
) -> onnx.NodeProto:
    """``source`` as the teacher's output ``value``: a Cast where the dtype differs."""
    if _elem_type(value) not in (0, learned_dtype):
        return helper.make_node("Cast", [source], [value.name], to=_elem_type(value))
    return helper.make_node("Identity", [source], [value.name])


class _OutputBuilder:
    """Nodes that turn the student's output tensor into the teacher's outputs."""

    def __init__(self, graph: onnx.GraphProto, student_output: str, output_kind: str) -> None:
        self.graph = graph
        self.student_output = student_output
        self.output_kind = output_kind
        self.nodes: list[onnx.NodeProto] = []
        self._probabilities: str | None = None
        self._indices: str | None = None

    def probabilities(self) -> str:
        """The student's probabilities: its outputs, softmaxed unless they already are."""
        if self._probabilities is None:
            name = "dropin_probabilities"
            self.nodes.append(helper.make_node("Softmax", [self.student_output], [name], axis=-1))
            self._probabilities = name
        return self._probabilities

    def learned(self, value: onnx.ValueInfoProto) -> None:
        """The output the student learned, with the teacher's meaning, dtype and rank."""
        source = (
            self.probabilities() if self.output_kind == "probabilities" else self.student_output
        )
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if len(dims) == 1:
            flat = "dropin_flat_output"
            shape = numpy_helper.from_array(np.array([-1], dtype=np.int64), "dropin_flat_shape")
            self.graph.initializer.append(shape)
            self.nodes.append(helper.make_node("Reshape", [source, shape.name], [flat]))
            source = flat
        self.nodes.append(_output_node(value, source))

    def label(self, value: onnx.ValueInfoProto, labels: np.ndarray) -> None:
        """The class label of the most probable class: ArgMax, then Gather on the labels.

        Where the labels are the class indices themselves (int64 0..K-1, as most
        scikit-learn classifiers trained on integer classes have), ArgMax gives the label
        output with no Gather: each node costs a batch-1 call about a microsecond.
        """
        indices_are_labels = (
            labels.dtype != object
            and np.array_equal(labels, np.arange(len(labels)))
            and _elem_type(value) == TensorProto.INT64
        )
        if self._indices is None:
            self._indices = value.name if indices_are_labels else "dropin_class_index"
            self.nodes.append(
                helper.make_node(
                    "ArgMax", [self.student_output], [self._indices], axis=1, keepdims=0
                )
            )
        if indices_are_labels:
            if self._indices != value.name:
                self.nodes.append(helper.make_node("Identity", [self._indices], [value.name]))
            return
        table = "dropin_class_labels"
        if not any(t.name == table for t in self.graph.initializer):
            if labels.dtype == object:
                tensor = helper.make_tensor(
                    table,
                    TensorProto.STRING,
                    [len(labels)],
                    [str(v).encode() for v in labels],  # type: ignore[misc]
                )
            else:
                tensor = numpy_helper.from_array(labels.astype(np.int64), table)
            self.graph.initializer.append(tensor)
        label_type = TensorProto.STRING if labels.dtype == object else TensorProto.INT64
        gathered = value.name if _elem_type(value) == label_type else "dropin_labels"
        self.nodes.append(helper.make_node("Gather", [table, self._indices], [gathered], axis=0))
        if gathered != value.name:
            self.nodes.append(_output_node(value, gathered, label_type))

    def zipmap(self, value: onnx.ValueInfoProto, teacher_zipmap: onnx.NodeProto) -> None:
        """A ZipMap over the probabilities with the teacher's ZipMap's class labels."""
        node = helper.make_node(
            "ZipMap", [self.probabilities()], [value.name], domain=ML_DOMAIN, name="dropin_zipmap"
        )
        node.attribute.extend(teacher_zipmap.attribute)
        self.nodes.append(node)


def _is_label(value: onnx.ValueInfoProto) -> bool:
    tensor = value.type.tensor_type
    rank = len(tensor.shape.dim) if value.type.HasField("tensor_type") else -1
    return rank in (1, 2) and tensor.elem_type in (TensorProto.INT64, TensorProto.STRING)


def _wire_outputs(
    graph: onnx.GraphProto, teacher: onnx.ModelProto, signature: TeacherSignature
) -> list[onnx.NodeProto]:
    """The teacher's outputs, in its order, from the student's output tensor."""
    builder = _OutputBuilder(graph, graph.output[0].name, str(signature.output_kind))
    zipmap = _zipmap_node(teacher)
    labels = class_labels(teacher)
    outputs = []
    for value in teacher.graph.output:
        if zipmap is not None and value.name == zipmap.output[0]:
            builder.zipmap(value, zipmap)
        elif value.name == signature.output:
            builder.learned(value)
        elif labels is not None and _is_label(value):
            builder.label(value, labels)
        else:
            continue  # an output the student does not reproduce; parity reports it
        outputs.append(_batch_first(value))
    del graph.output[:]
    graph.output.extend(outputs)
    return builder.nodes


def make_dropin(
    student_path: str | Path, teacher_path: str | Path, signature: TeacherSignature
) -> Path:
    """Rewrite ``student_path`` in place to take the teacher's inputs and give its outputs.

    ``signature`` is the teacher's: which output the student learned and what it
    holds (``output_kind``). Raises :class:`ExportFailed` when the rewritten graph
    does not reproduce the student file it came from (see :func:`check_dropin`).
    """
    student_path = Path(student_path)
    teacher = onnx.load(str(teacher_path), load_external_data=False)
    model = onnx.load(str(student_path))
    external = student_path.with_name(student_path.name + ".data").exists()
    graph = model.graph
    teacher_inputs = _graph_inputs(teacher)
    names = {v.name for v in teacher_inputs} | {v.name for v in teacher.graph.output}
    _free_teacher_names(graph, names)
    input_nodes = _wire_inputs(graph, teacher_inputs)
    output_nodes = _wire_outputs(graph, teacher, signature)
    nodes = [*input_nodes, *graph.node, *output_nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    if any(n.domain == ML_DOMAIN for n in output_nodes) and not any(
        o.domain == ML_DOMAIN for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid(ML_DOMAIN, 1))
    model.metadata_props.add(
        key="distillery.dropin_for", value=str(teacher.graph.name or "teacher")
    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportFailed(f"the drop-in student graph is invalid: {exc}") from None
    onnx.save_model(
        model,
        str(student_path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=student_path.name + ".data",
    )
    return student_path


# --------------------------------------------------------------------------- feeds and parity


def _session(path: str | Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _declared_rank(array: np.ndarray, shape: list[Any]) -> np.ndarray:
    """``array`` reshaped to the declared per-sample shape when only the rank differs."""
    dims = shape[1:]
    known = bool(dims) and all(isinstance(d, int) and d > 0 for d in dims)
    if known and len(dims) != array.ndim - 1 and np.prod(dims) == np.prod(array.shape[1:]):
        return array.reshape(len(array), *dims)
    return array


def teacher_feed(signature: TeacherSignature, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The feed dict the teacher runs on: ``arrays`` under its input names, in its dtypes."""
    feed: dict[str, Any] = {}
    for spec in signature.inputs:
        if spec.name in arrays:
            array = arrays[spec.name]
        elif len(signature.inputs) == 1 and len(arrays) == 1:
            array = next(iter(arrays.values()))
        elif len(signature.inputs) == 1 and "inputs" in arrays:
            array = arrays["inputs"]
        elif spec.name == "token_type_ids" and "input_ids" in arrays:
            array = np.zeros_like(arrays["input_ids"])
        else:
            raise ExportFailed(f"no array feeds the teacher's input {spec.name!r}")
        dtype = np.dtype(object) if spec.dtype == "string" else np.dtype(spec.dtype)
        if wants_channels_last(array.shape, spec.shape[1:]):
            array = array.transpose(TO_CHANNELS_LAST)
        feed[spec.name] = np.ascontiguousarray(_declared_rank(array, spec.shape).astype(dtype))
    return feed


def check_dropin(
    path: str | Path,
    signature: TeacherSignature,
    feed: Mapping[str, Any],
    expected: np.ndarray,
    tolerance: float = 1e-4,
) -> float:
    """The drop-in file's learned output against the student's own, on ``feed``; max |diff|.

    ``expected`` is the student's raw output (logits where the teacher gives
    probabilities). Raises :class:`ExportFailed` past ``tolerance`` (relative to
    outputs over 1).
    """
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    if signature.output not in names:
        raise ExportFailed(f"the drop-in student has no output {signature.output!r}")
    values = session.run([str(signature.output)], dict(feed))[0]
    labels = class_labels(onnx.load(str(path), load_external_data=False))
    # A ZipMap's maps are read in the order of the class labels, the student's columns.
    keys = labels.tolist() if labels is not None else None
    actual = _as_array(values, keys).astype(np.float64)
    reference = expected.astype(np.float64)
    if signature.output_kind == "probabilities":
        shifted = np.exp(reference - reference.max(axis=1, keepdims=True))
        reference = shifted / shifted.sum(axis=1, keepdims=True)
    reference = reference.reshape(actual.shape)
    gap = float(np.abs(actual - reference).max()) if actual.size else 0.0
    if gap > tolerance * max(1.0, float(np.abs(reference).max(initial=0.0))):
        raise ExportFailed(f"the drop-in student differs from the student by {gap:.3g}")
    return gap


def _type_name(value: Any) -> str:
    return str(value.type)


def _as_array(values: Any, keys: list[Any] | None) -> np.ndarray:
    """An output as an array; a ZipMap's list of maps as (rows, classes) in ``keys`` order."""
    if isinstance(values, list) and values and isinstance(values[0], dict):
        order = keys if keys is not None else list(values[0])
        return np.asarray([[row[k] for k in order] for row in values], dtype=np.float64)
    return np.asarray(values)


def _closeness(teacher: np.ndarray, student: np.ndarray) -> dict[str, Any]:
    """Agreement of labels, or of argmax and the max/mean |diff| of numeric outputs."""
    if teacher.shape != student.shape:
        return {"shape_matched": False}
    if teacher.dtype == object or np.issubdtype(teacher.dtype, np.integer):
        return {"shape_matched": True, "agreement": float(np.mean(teacher == student))}
    diff = np.abs(teacher.astype(np.float64) - student.astype(np.float64))
    result: dict[str, Any] = {
        "shape_matched": True,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
    }
    if teacher.ndim == 2 and teacher.shape[1] > 1:
        result["agreement"] = float(np.mean(teacher.argmax(1) == student.argmax(1)))
    return result


def parity(
    teacher_path: str | Path, student_path: str | Path, feed: Mapping[str, Any]
) -> dict[str, Any]:
    """Teacher and student run in onnxruntime on the same ``feed``: names, dtypes, closeness.

    ``inputs`` and ``outputs`` list every teacher name with both dtypes (onnxruntime's
    type strings) and whether the student matches it; each output also says how close
    the student is (label agreement; max and mean |diff|, argmax agreement).
    """
    teacher, student = _session(teacher_path), _session(student_path)
    student_inputs = {v.name: _type_name(v) for v in student.get_inputs()}
    student_outputs = {v.name: _type_name(v) for v in student.get_outputs()}
    inputs = [_name_entry(v.name, _type_name(v), student_inputs) for v in teacher.get_inputs()]
    outputs = [_name_entry(v.name, _type_name(v), student_outputs) for v in teacher.get_outputs()]
    teacher_values = teacher.run(None, dict(feed))
    shared = [o["name"] for o in outputs if o["student_dtype"] is not None]
    student_values = dict(zip(shared, student.run(shared, dict(feed)), strict=True))
    for entry, values in zip(outputs, teacher_values, strict=True):
        if entry["name"] in student_values:
            keys = list(values[0]) if isinstance(values, list) and values else None
            entry.update(
                _closeness(_as_array(values, keys), _as_array(student_values[entry["name"]], keys))
            )
    return {
        "rows": len(next(iter(feed.values()))) if feed else 0,
        "names_matched": all(e["student_dtype"] is not None for e in inputs + outputs),
        "dtypes_matched": all(e["matched"] for e in inputs + outputs),
        "inputs": inputs,
        "outputs": outputs,
    }


def _name_entry(name: str, teacher_dtype: str, student: Mapping[str, str]) -> dict[str, Any]:
    student_dtype = student.get(name)
    return {
        "name": name,
        "teacher_dtype": teacher_dtype,
        "student_dtype": student_dtype,
        "matched": student_dtype == teacher_dtype,
    }
