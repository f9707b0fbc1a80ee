"""Teacher sniffing and signatures, on real exported teachers and hand-built bundles."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from tests.worker.engine.factories import (
    TeacherZoo,
    escaping_bundle,
    external_data,
    teacher_zoo,
    zip_files,
)
from tests.worker.engine.hostile_files import Member, crafted_zip, measured
from worker.engine import onnx_graph
from worker.engine.errors import ArchiveUnsafe, TeacherInvalid, UnsupportedFormat
from worker.engine.inspection import extract_onnx_bundle, inspect, screen_teacher, sniff_teacher

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def zoo() -> TeacherZoo:
    return teacher_zoo()


def _refused(path: Path) -> UnsupportedFormat:
    with pytest.raises(UnsupportedFormat) as err:
        sniff_teacher(path)
    with pytest.raises(UnsupportedFormat):
        inspect(path)
    return err.value


# --------------------------------------------------------------------------- ONNX


def test_inspection_does_not_import_torch(zoo: TeacherZoo) -> None:
    code = (
        "import json, sys\n"
        "from worker.engine.inspection import inspect, sniff_teacher\n"
        f"paths = {[str(zoo.mlp_dynamo), str(zoo.forest_zipmap)]!r}\n"
        "out = [(sniff_teacher(p), inspect(p).to_dict()) for p in paths]\n"
        "assert 'torch' not in sys.modules, 'inspection imported torch'\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    (fmt, mlp), (_, forest) = json.loads(done.stdout)
    assert fmt == "onnx" and mlp["task"] == "classification"
    assert forest["output_kind"] == "probabilities"


def test_dynamo_mlp_signature_counts_external_weights(zoo: TeacherZoo) -> None:
    sig = inspect(zoo.mlp_dynamo)
    data = external_data(zoo.mlp_dynamo)
    assert data.is_file()
    assert sig.format == "onnx"
    assert [(t.name, t.shape, t.dtype) for t in sig.inputs] == [("input", ["batch", 64], "float32")]
    assert sig.outputs[0].name == "logits" and sig.outputs[0].shape == ["batch", 10]
    assert (sig.task, sig.output, sig.output_kind) == ("classification", "logits", "logits")
    assert sig.num_classes == sig.output_dim == 10
    assert sig.parameters == sum(p.numel() for p in zoo.mlp.parameters())
    assert sig.bytes == zoo.mlp_dynamo.stat().st_size + data.stat().st_size
    assert sig.modality == "tabular"


def test_legacy_and_cnn_signatures(zoo: TeacherZoo) -> None:
    legacy = inspect(zoo.mlp_legacy)
    assert legacy.parameters == sum(p.numel() for p in zoo.mlp.parameters())
    assert legacy.extra["opsets"]["ai.onnx"] == 17
    assert legacy.output_kind == "logits"
    cnn = inspect(zoo.cnn_dynamo)
    assert cnn.inputs[0].shape == ["batch", 1, 8, 8] and cnn.modality == "image"
    assert cnn.parameters == sum(p.numel() for p in zoo.cnn.parameters())
    assert cnn.num_classes == 10


def test_content_not_name_decides(zoo: TeacherZoo, tmp_path: Path) -> None:
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(zoo.mlp_legacy.read_bytes())
    assert sniff_teacher(renamed) == "onnx"


@pytest.mark.parametrize("zipmap", [True, False])
def test_forest_is_a_probability_classifier(zoo: TeacherZoo, zipmap: bool) -> None:
    path = zoo.forest_zipmap if zipmap else zoo.forest_plain
    sig = inspect(path)
    assert (sig.task, sig.output_kind) == ("classification", "probabilities")
    assert sig.output == ("output_probability" if zipmap else "probabilities")
    assert sig.num_classes == 10 and sig.parameters == 0 and sig.bytes > 0
    assert sig.architecture == "RandomForestClassifier" and sig.extra["sklearn"]
    assert sig.extra["classes"] == [str(c) for c in range(10)]
    assert ("zipmap" in sig.extra) is zipmap


def test_regressor_signature(zoo: TeacherZoo) -> None:
    sig = inspect(zoo.regressor_path)
    assert (sig.task, sig.output_kind, sig.output_dim) == ("regression", "values", 1)
    assert sig.output == "variable" and sig.num_classes is None


def test_softmax_output_reads_as_probabilities(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["n", 3])
    w = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w"], ["z"]),
            onnx.helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ],
        "net",
        [x],
        [y],
        [w],
    )
    path = tmp_path / "softmax.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    sig = inspect(path)
    assert sig.output_kind == "probabilities" and sig.parameters == 12


# --------------------------------------------------------------------------- bundles


def test_zip_bundle_with_external_data(zoo: TeacherZoo, tmp_path: Path) -> None:
    data = external_data(zoo.mlp_dynamo)
    bundle = zip_files(
        tmp_path / "mlp.zip",
        {f"mlp/{zoo.mlp_dynamo.name}": zoo.mlp_dynamo, f"mlp/{data.name}": data},
    )
    assert sniff_teacher(bundle) == "onnx"
    assert inspect(bundle).to_dict() == inspect(zoo.mlp_dynamo).to_dict()


def test_bundle_data_outside_the_bundle_is_refused(zoo: TeacherZoo, tmp_path: Path) -> None:
    bundle = escaping_bundle(zoo.mlp_dynamo, tmp_path / "escape.zip")
    with pytest.raises(ArchiveUnsafe):
        inspect(bundle)


def test_member_escaping_the_zip_is_refused(zoo: TeacherZoo, tmp_path: Path) -> None:
    bundle = zip_files(tmp_path / "evil.zip", {"model.onnx": zoo.mlp_legacy, "../x": b"x"})
    with pytest.raises(ArchiveUnsafe):
        sniff_teacher(bundle)


def test_bundle_with_two_graphs_is_invalid(zoo: TeacherZoo, tmp_path: Path) -> None:
    bundle = zip_files(tmp_path / "two.zip", {"a.onnx": zoo.mlp_legacy, "b.onnx": zoo.mlp_legacy})
    with pytest.raises(TeacherInvalid):
        sniff_teacher(bundle)


def _safetensors_bytes(tmp_path: Path, arrays: dict[str, np.ndarray]) -> bytes:
    path = tmp_path / "w.safetensors"
    save_file(arrays, str(path))
    return path.read_bytes()


def test_safetensors_bundle_signature(tmp_path: Path) -> None:
    weights = _safetensors_bytes(
        tmp_path,
        {
            "net.0.weight": np.zeros((32, 64), np.float32),
            "net.0.bias": np.zeros(32, np.float32),
            "head.weight": np.zeros((10, 32), np.float32),
            "head.bias": np.zeros(10, np.float32),
        },
    )
    config = {
        "architecture": "mlp",
        "task": "classification",
        "modality": "tabular",
        "input_names": ["inputs"],
        "input_shape": [64],
        "output_dim": 10,
        "hidden_sizes": [32],
    }
    bundle = zip_files(
        tmp_path / "student.zip",
        {"student.safetensors": weights, "student_config.json": json.dumps(config).encode()},
    )
    assert sniff_teacher(bundle) == "safetensors"
    sig = inspect(bundle)
    assert sig.format == "safetensors" and sig.architecture == "mlp"
    assert sig.parameters == 32 * 64 + 32 + 10 * 32 + 10
    assert sig.inputs[0].shape == ["batch", 64]
    assert (sig.task, sig.output_kind, sig.num_classes) == ("classification", "logits", 10)

    config["architecture"] = "resnet"
    odd = zip_files(
        tmp_path / "odd.zip",
        {"model.safetensors": weights, "config.json": json.dumps(config).encode()},
    )
    with pytest.raises(TeacherInvalid):
        sniff_teacher(odd)


def _bert_folder(tmp_path: Path, name: str, **config: object) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "vocab_size": 100,
                **config,
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    save_file(
        {"embeddings.word_embeddings.weight": np.zeros((100, 32), np.float32)},
        str(folder / "model.safetensors"),
    )
    return folder


def _zip_folder(folder: Path, dest: Path) -> Path:
    files: dict[str, bytes | Path] = {
        f"{folder.name}/{p.relative_to(folder).as_posix()}": p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    return zip_files(dest, files)


def test_transformers_classifier_signature(tmp_path: Path) -> None:
    folder = _bert_folder(
        tmp_path,
        "clf",
        architectures=["BertForSequenceClassification"],
        id2label={"0": "neg", "1": "neu", "2": "pos"},
    )
    bundle = _zip_folder(folder, tmp_path / "clf.zip")
    assert sniff_teacher(bundle) == "huggingface"
    assert sniff_teacher(folder) == "huggingface"
    sig = inspect(bundle)
    assert sig.format == "huggingface" and sig.modality == "text"
    assert (sig.task, sig.output_kind, sig.num_classes) == ("classification", "logits", 3)
    assert [t.name for t in sig.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert sig.parameters == 3200 and sig.architecture == "BertForSequenceClassification"
    assert sig.extra["labels"] == ["neg", "neu", "pos"]


def test_sentence_transformers_signature(tmp_path: Path) -> None:
    folder = _bert_folder(tmp_path, "st", architectures=["BertModel"])
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text(
        json.dumps({"in_features": 32, "out_features": 16})
    )
    save_file(
        {"linear.weight": np.zeros((16, 32), np.float32)},
        str(folder / "2_Dense" / "model.safetensors"),
    )
    sig = inspect(_zip_folder(folder, tmp_path / "st.zip"))
    assert (sig.task, sig.output_kind, sig.output_dim) == ("embedding", "embedding", 16)
    assert sig.parameters == 3200 + 512
    assert sig.architecture == "SentenceTransformer(bert)"


def test_transformers_folder_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    folder = _bert_folder(tmp_path, "pickled", architectures=["BertModel"])
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    err = _refused(_zip_folder(folder, tmp_path / "p.zip"))
    assert "pytorch_model.bin" in err.message and "safetensors" in err.message


# --------------------------------------------------------------------------- refusals


class _Payload:
    """Unpickling this would create ``marker``: sniffing must never unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickle_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "model.onnx"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    err = _refused(path)
    assert "pickle" in err.message and "ONNX" in err.message and "safetensors" in err.message
    assert not marker.exists()


def _torch_files(tmp_path: Path) -> dict[str, Path]:
    import torch
    from torch import nn

    module = nn.Sequential(nn.Linear(4, 2))
    out = {name: tmp_path / name for name in ("sd.pt", "legacy.pt", "ts.pt", "m.pt2")}
    torch.save(module.state_dict(), out["sd.pt"])
    torch.save(module.state_dict(), out["legacy.pt"], _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(module), out["ts.pt"])
    exported = torch.export.export(module, (torch.randn(2, 4),))
    torch.export.save(exported, out["m.pt2"])
    return out


def test_torch_formats_are_refused(tmp_path: Path) -> None:
    for name, path in _torch_files(tmp_path).items():
        err = _refused(path)
        assert "ONNX" in err.message and "safetensors" in err.message, name
        assert err.code == "unsupported_format"


def test_unknown_content_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _refused(noise)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _refused(empty)
    other_zip = zip_files(tmp_path / "readme.zip", {"README.txt": b"hello"})
    _refused(other_zip)


def test_bare_safetensors_file_needs_a_config(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors_bytes(tmp_path, {"w": np.zeros(3, np.float32)}))
    assert "config.json" in _refused(path).message


def test_truncated_onnx_is_invalid(zoo: TeacherZoo, tmp_path: Path) -> None:
    data = zoo.mlp_legacy.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherInvalid):
        sniff_teacher(path)
    with pytest.raises(TeacherInvalid):
        inspect(path)


def test_missing_file_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(TeacherInvalid):
        sniff_teacher(tmp_path / "nothing.onnx")


def test_plain_graph_with_missing_external_data_is_invalid(zoo: TeacherZoo, tmp_path: Path) -> None:
    lonely = tmp_path / zoo.mlp_dynamo.name
    lonely.write_bytes(zoo.mlp_dynamo.read_bytes())
    assert os.path.exists(lonely) and sniff_teacher(lonely) == "onnx"
    with pytest.raises(TeacherInvalid):
        inspect(lonely)


# --------------------------------------------------------------------------- hostile graphs

FLOAT = onnx.TensorProto.FLOAT


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def _two_identities_feeding_each_other(path: Path) -> Path:
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Identity", ["b"], ["a"], name="A"),
            onnx.helper.make_node("Identity", ["a"], ["b"], name="B"),
        ],
        "g",
        [],
        [onnx.helper.make_tensor_value_info("a", FLOAT, ["n", 3])],
    )
    return _save(graph, path)


@pytest.mark.timeout(60)
def test_a_cyclic_graph_is_refused_in_bounded_time(tmp_path: Path) -> None:
    path = _two_identities_feeding_each_other(tmp_path / "cycle.onnx")
    assert path.stat().st_size < 120
    with measured() as usage, pytest.raises(TeacherInvalid) as err:
        inspect(path)
    assert "cycle through nodes 'A', 'B'" in err.value.message
    assert err.value.field == "teacher"
    assert usage.seconds < 5
    with pytest.raises(TeacherInvalid, match="cycle"):
        sniff_teacher(path)


def _if_node(
    then_nodes: list[onnx.NodeProto],
    output: str,
    initializer: Sequence[onnx.TensorProto] = (),
) -> onnx.NodeProto:
    t = onnx.helper.make_tensor_value_info("t", FLOAT, ["n", 3])
    branch = onnx.helper.make_graph(then_nodes, "branch", [], [t], initializer)
    return onnx.helper.make_node(
        "If", ["cond"], [output], name="if", then_branch=branch, else_branch=branch
    )


def _with_if(nodes: list[onnx.NodeProto], path: Path) -> Path:
    cond = onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    x = onnx.helper.make_tensor_value_info("x", FLOAT, ["n", 3])
    y = onnx.helper.make_tensor_value_info("y", FLOAT, ["n", 3])
    return _save(onnx.helper.make_graph(nodes, "g", [cond, x], [y]), path)


@pytest.mark.timeout(60)
def test_a_cycle_inside_a_subgraph_is_refused(tmp_path: Path) -> None:
    branch_cycle = [
        onnx.helper.make_node("Identity", ["u"], ["t"], name="inner_t"),
        onnx.helper.make_node("Identity", ["t"], ["u"], name="inner_u"),
    ]
    path = _with_if([_if_node(branch_cycle, "y")], tmp_path / "sub.onnx")
    with pytest.raises(TeacherInvalid, match="cycle through nodes 'inner_t', 'inner_u'"):
        inspect(path)


@pytest.mark.timeout(60)
def test_a_cycle_through_what_a_subgraph_reads_from_outside_is_refused(tmp_path: Path) -> None:
    # The If reads "back" inside its branch; "back" is computed from the If's own output.
    reads_outer = [onnx.helper.make_node("Add", ["x", "back"], ["t"], name="branch_add")]
    nodes = [
        _if_node(reads_outer, "y"),
        onnx.helper.make_node("Relu", ["y"], ["back"], name="relu"),
    ]
    with pytest.raises(TeacherInvalid, match="cycle through nodes 'if', 'relu'"):
        inspect(_with_if(nodes, tmp_path / "outer.onnx"))


def test_a_cyclic_function_body_is_refused(tmp_path: Path) -> None:
    body = [
        onnx.helper.make_node("Identity", ["q"], ["p"], name="fn_p"),
        onnx.helper.make_node("Add", ["i", "p"], ["q"], name="fn_q"),
    ]
    function = onnx.helper.make_function(
        "local", "Loopy", ["i"], ["q"], body, [onnx.helper.make_opsetid("", 17)]
    )
    x = onnx.helper.make_tensor_value_info("x", FLOAT, ["n", 3])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Loopy", ["x"], ["y"], domain="local")],
        "g",
        [x],
        [onnx.helper.make_tensor_value_info("y", FLOAT, ["n", 3])],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("local", 1)],
        functions=[function],
    )
    onnx.save(model, tmp_path / "fn.onnx")
    with pytest.raises(TeacherInvalid, match="cycle through nodes 'fn_p', 'fn_q'"):
        inspect(tmp_path / "fn.onnx")


def test_a_value_produced_twice_is_refused(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", FLOAT, ["n", 3])
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["y"], name="first"),
            onnx.helper.make_node("Neg", ["x"], ["y"], name="second"),
        ],
        "g",
        [x],
        [onnx.helper.make_tensor_value_info("y", FLOAT, ["n", 3])],
    )
    with pytest.raises(TeacherInvalid, match="'y' is produced by two nodes"):
        inspect(_save(graph, tmp_path / "twice.onnx"))


def test_graph_size_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = onnx.helper.make_tensor_value_info("x", FLOAT, ["n", 3])
    chain = [onnx.helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(4)]
    weights = [onnx.numpy_helper.from_array(np.zeros(3, np.float32), f"w{i}") for i in range(4)]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["v0"]), *chain],
        "g",
        [x],
        [onnx.helper.make_tensor_value_info("v4", FLOAT, ["n", 3])],
        weights,
    )
    path = _save(graph, tmp_path / "chain.onnx")
    assert inspect(path).parameters == 12
    monkeypatch.setattr(onnx_graph, "MAX_GRAPH_NODES", 4)
    with pytest.raises(TeacherInvalid, match="more than 4 nodes"):
        inspect(path)
    monkeypatch.setattr(onnx_graph, "MAX_GRAPH_NODES", 5)
    monkeypatch.setattr(onnx_graph, "MAX_INITIALIZERS", 3)
    with pytest.raises(TeacherInvalid, match="more than 3 initializers"):
        inspect(path)


def _external(name: str, location: str) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=FLOAT, dims=[1, 3])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _branch_data_at(location: str, path: Path) -> Path:
    """A graph whose If branches read a [1, 3] weight stored in ``location``."""
    read = [onnx.helper.make_node("Identity", ["w"], ["t"], name="read_w")]
    return _with_if([_if_node(read, "y", initializer=[_external("w", location)])], path)


def test_external_data_of_a_subgraph_must_stay_beside_the_graph(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 12)
    with pytest.raises(ArchiveUnsafe):
        inspect(_branch_data_at("../secret.bin", inner / "model.onnx"))
    (inner / "w.bin").write_bytes(b"\0" * 12)
    ok = _branch_data_at("w.bin", inner / "ok.onnx")
    assert inspect(ok).bytes == ok.stat().st_size + 12


def test_external_data_of_a_subgraph_must_stay_in_the_bundle(tmp_path: Path) -> None:
    escaping = _branch_data_at("../../etc/passwd", tmp_path / "model.onnx")
    bundle = zip_files(tmp_path / "escape.zip", {"m/model.onnx": escaping, "m/w.bin": b"\0" * 12})
    with pytest.raises(ArchiveUnsafe):
        inspect(bundle)
    absent = _branch_data_at("absent.bin", tmp_path / "absent.onnx")
    bundle = zip_files(tmp_path / "absent.zip", {"m/model.onnx": absent, "m/w.bin": b"\0" * 12})
    with pytest.raises(TeacherInvalid, match=r"absent\.bin"):
        inspect(bundle)


def _absurd_initializer(path: Path, dims: list[int]) -> Path:
    weight = onnx.TensorProto(name="w", data_type=FLOAT, dims=dims)
    x = onnx.helper.make_tensor_value_info("x", FLOAT, ["n", 3])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [x],
        [onnx.helper.make_tensor_value_info("y", FLOAT, ["n", 3])],
        [weight],
    )
    return _save(graph, path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dims", [[2**62, 2**62], [2**62] * 20_000, [2**44 + 1], [-1, 3]])
def test_absurd_initializer_dimensions_are_refused(tmp_path: Path, dims: list[int]) -> None:
    path = _absurd_initializer(tmp_path / "huge.onnx", dims)
    with measured() as usage, pytest.raises(TeacherInvalid) as err:
        # What the API stores: a parameter count past 4300 digits cannot even become JSON.
        json.dumps(inspect(path).to_dict())
    assert "initializer 'w'" in err.value.message
    assert usage.seconds < 5


def test_absurd_input_dimensions_are_refused(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", FLOAT, ["n", 2**40, 2**40])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [x],
        [onnx.helper.make_tensor_value_info("y", FLOAT, ["n", 3])],
    )
    with pytest.raises(TeacherInvalid, match="tensor 'x' has more than"):
        inspect(_save(graph, tmp_path / "wide.onnx"))


def test_absurd_safetensors_shapes_are_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}})
    raw = len(header).to_bytes(8, "little") + header.encode()
    config = {"architecture": "mlp", "input_names": ["inputs"], "output_dim": 2}
    bundle = zip_files(
        tmp_path / "huge.zip",
        {"model.safetensors": raw, "config.json": json.dumps(config).encode()},
    )
    with pytest.raises(TeacherInvalid, match="tensor 'w' has a dimension"):
        inspect(bundle)


@pytest.mark.timeout(120)
def test_a_decompression_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    # 1.1 MiB on disk; model.onnx expands to 1 GiB (953 times, under the old cap of 1000).
    bomb = crafted_zip(tmp_path / "bomb.zip", {"model.onnx": Member(bytes(256 << 10), 4096)})
    assert bomb.stat().st_size < 1.2 * 2**20
    for check in (inspect, sniff_teacher, screen_teacher):
        with measured() as usage, pytest.raises(ArchiveUnsafe, match="compression ratio"):
            check(bomb)
        assert usage.peak_bytes < 16 * 2**20, check.__name__
        assert usage.seconds < 10, check.__name__


def _files_under(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.timeout(300)
def test_an_onnx_bundle_extracts_only_its_graph_and_referenced_data(
    zoo: TeacherZoo, tmp_path: Path
) -> None:
    from worker.engine.teachers import load_teacher

    data = external_data(zoo.mlp_dynamo)
    # 2 GiB that no tensor references, compressing 60 times (within the teacher ratio cap).
    noise = random.Random(0).randbytes(16 << 10)
    junk = Member(noise + bytes((1 << 20) - len(noise)), 2048)
    bundle = crafted_zip(
        tmp_path / "mlp.zip",
        {
            "mlp/model.onnx": zoo.mlp_dynamo.read_bytes(),
            f"mlp/{data.name}": data.read_bytes(),
            "mlp/junk.bin": junk,
        },
    )
    assert bundle.stat().st_size < 40 * 2**20
    needed = {
        "mlp/model.onnx": zoo.mlp_dynamo.stat().st_size,
        f"mlp/{data.name}": data.stat().st_size,
    }

    extracted = extract_onnx_bundle(bundle, tmp_path / "out")
    assert _files_under(tmp_path / "out") == needed
    assert extracted.graph == (tmp_path / "out" / "mlp" / "model.onnx")

    work = tmp_path / "work"
    with measured() as usage:
        teacher = load_teacher(bundle, device="cpu", work_dir=work)
    written = _files_under(work)
    assert not any(name.endswith("junk.bin") for name in written)
    # The graph and its data, and the runtime's copies of the graph beside them.
    assert sum(written.values()) < 2 * sum(needed.values())
    assert teacher.signature.output == "logits" and usage.seconds < 120
