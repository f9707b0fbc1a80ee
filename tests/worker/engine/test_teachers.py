"""Teacher runtimes on real teachers: ONNX (torch conversion and onnxruntime), safetensors."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests.worker.engine.factories import (
    TeacherZoo,
    escaping_bundle,
    external_data,
    teacher_zoo,
    zip_files,
)
from worker.engine import onnx_torch
from worker.engine.errors import (
    ArchiveUnsafe,
    TeacherIncompatible,
    TeacherInvalid,
    UnsupportedFormat,
)
from worker.engine.teachers import TEACHER_RUNTIMES, OnnxTeacher, TeacherRuntime, load_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def zoo() -> TeacherZoo:
    return teacher_zoo()


def _load(path: Path, tmp_path: Path) -> TeacherRuntime:
    return load_teacher(path, device=CPU, work_dir=tmp_path / "work")


def _batch(x: np.ndarray) -> dict[str, torch.Tensor]:
    return {"inputs": torch.from_numpy(np.ascontiguousarray(x))}


def _reference(module: nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return module(torch.from_numpy(x))


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def test_registry_names_the_built_in_formats() -> None:
    assert {"onnx", "safetensors"} <= set(TEACHER_RUNTIMES.names())


# --------------------------------------------------------------------------- ONNX nets


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_mlp_runs_in_onnxruntime_then_in_checked_torch(
    zoo: TeacherZoo, tmp_path: Path, exporter: str
) -> None:
    path = zoo.mlp_dynamo if exporter == "dynamo" else zoo.mlp_legacy
    teacher = _load(path, tmp_path)
    assert isinstance(teacher, OnnxTeacher) and teacher.backend == "onnxruntime"
    x = zoo.x[:50]
    expected = _reference(zoo.mlp, x)
    before = teacher.predict(_batch(x))
    assert before.dtype == torch.float32 and before.shape == (50, 10)
    torch.testing.assert_close(before, expected, atol=1e-4, rtol=1e-4)

    teacher.prepare(_batch(zoo.x[:16]))
    # mypy keeps the "onnxruntime" narrowing from before prepare(), which sets the backend.
    assert teacher.backend == "torch", teacher.backend_reason  # type: ignore[comparison-overlap]
    assert "matches onnxruntime" in teacher.backend_reason
    assert teacher.module is not None and not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    after = teacher.predict(_batch(x))
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)
    assert (after.argmax(1) == torch.from_numpy(zoo.y[:50])).float().mean() > 0.9

    data = external_data(path)
    files = [path, data] if data.exists() else [path]
    assert teacher.digest == _sha256(*files)


def test_onnx_cnn_converts_and_takes_flat_rows(zoo: TeacherZoo, tmp_path: Path) -> None:
    teacher = _load(zoo.cnn_dynamo, tmp_path)
    images = zoo.images[:40]
    teacher.prepare(_batch(images[:8]))
    assert teacher.backend == "torch", teacher.backend_reason
    expected = _reference(zoo.cnn, images)
    torch.testing.assert_close(teacher.predict(_batch(images)), expected, atol=1e-4, rtol=1e-4)
    # Rows of 64 features fit the graph's (1, 8, 8) input: reshaped, not refused.
    flat = teacher.predict(_batch(zoo.x[:40]))
    torch.testing.assert_close(flat, expected, atol=1e-4, rtol=1e-4)


def test_hint_features_agree_across_backends(zoo: TeacherZoo, tmp_path: Path) -> None:
    teacher = _load(zoo.mlp_dynamo, tmp_path)
    layers = teacher.hint_layers()
    assert layers, "an MLP has intermediate layers"
    batch = _batch(zoo.x[:20])
    with torch.no_grad():
        hidden = zoo.mlp[1](zoo.mlp[0](batch["inputs"]))
    out_ort, feat_ort = teacher.predict_with_features(batch, layers[0])
    # Best first: the last hidden activation, right before the output layer.
    torch.testing.assert_close(feat_ort, hidden, atol=1e-4, rtol=1e-4)
    teacher.prepare(batch)
    assert teacher.backend == "torch"
    out_torch, feat_torch = teacher.predict_with_features(batch, layers[0])
    torch.testing.assert_close(out_torch, out_ort, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feat_torch, feat_ort, atol=1e-4, rtol=1e-4)
    with pytest.raises(TeacherIncompatible):
        teacher.predict_with_features(batch, "no-such-tensor")


def test_missing_values_in_the_probe_do_not_block_the_conversion(
    zoo: TeacherZoo, tmp_path: Path
) -> None:
    teacher = _load(zoo.mlp_legacy, tmp_path)
    probe = zoo.x[:8].copy()
    probe[3, 5] = np.nan
    teacher.prepare(_batch(probe))
    assert teacher.backend == "torch", teacher.backend_reason


def test_fixed_batch_graph_runs_row_by_row(zoo: TeacherZoo, tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(
        zoo.mlp, (torch.from_numpy(zoo.x[:1]),), str(path), dynamo=False, input_names=["x"]
    )
    assert inspect_shape(path) == [1, 64]
    teacher = _load(path, tmp_path)
    x = zoo.x[:7]
    expected = _reference(zoo.mlp, x)
    torch.testing.assert_close(teacher.predict(_batch(x)), expected, atol=1e-4, rtol=1e-4)
    teacher.prepare(_batch(x))
    torch.testing.assert_close(teacher.predict(_batch(x)), expected, atol=1e-4, rtol=1e-4)


def inspect_shape(path: Path) -> list[int]:
    model = onnx.load(path, load_external_data=False)
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


# --------------------------------------------------------------------------- fallbacks


def _com_microsoft_gelu(path: Path) -> Path:
    """A graph with an onnxruntime contrib op (com.microsoft::Gelu) our converter lacks."""
    w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("MatMul", ["x", "w"], ["h"]),
            onnx.helper.make_node("Gelu", ["h"], ["y"], domain="com.microsoft"),
        ],
        "contrib",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 10])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", 17),
            onnx.helper.make_opsetid("com.microsoft", 1),
        ],
    )
    onnx.save(model, path)
    return path


def test_unsupported_op_falls_back_to_onnxruntime(zoo: TeacherZoo, tmp_path: Path) -> None:
    teacher = _load(_com_microsoft_gelu(tmp_path / "contrib.onnx"), tmp_path)
    batch = _batch(zoo.x[:10])
    teacher.prepare(batch)
    assert teacher.backend == "onnxruntime"
    assert "com.microsoft::Gelu" in teacher.backend_reason
    out = teacher.predict(batch)
    assert out.shape == (10, 10) and torch.isfinite(out).all()


def test_a_wrong_conversion_is_never_used(
    zoo: TeacherZoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A test of the guard: a deliberately wrong Relu converter must be caught by the
    # probe comparison against onnxruntime, so the teacher stays on onnxruntime.
    def wrong_relu(node: onnx_torch.NodeInfo, ins: list[torch.Tensor | None]) -> torch.Tensor:
        assert ins[0] is not None
        return torch.relu(ins[0]) + 0.5

    monkeypatch.setitem(onnx_torch.ONNX_OPS._items, "Relu", wrong_relu)
    teacher = _load(zoo.mlp_legacy, tmp_path)
    teacher.prepare(_batch(zoo.x[:16]))
    assert teacher.backend == "onnxruntime" and teacher.module is None
    assert "disagrees" in teacher.backend_reason
    expected = _reference(zoo.mlp, zoo.x[:30])
    torch.testing.assert_close(teacher.predict(_batch(zoo.x[:30])), expected, atol=1e-4, rtol=1e-4)


def test_a_conversion_that_crashes_is_not_used(
    zoo: TeacherZoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_gemm(node: onnx_torch.NodeInfo, ins: list[torch.Tensor | None]) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setitem(onnx_torch.ONNX_OPS._items, "Gemm", broken_gemm)
    teacher = _load(zoo.mlp_legacy, tmp_path)
    teacher.prepare(_batch(zoo.x[:4]))
    assert teacher.backend == "onnxruntime" and "boom" in teacher.backend_reason


# --------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("zipmap", [True, False])
def test_forest_gives_class_probabilities(zoo: TeacherZoo, tmp_path: Path, zipmap: bool) -> None:
    teacher = _load(zoo.forest_zipmap if zipmap else zoo.forest_plain, tmp_path)
    x = zoo.x[:100]
    teacher.prepare(_batch(x[:8]))
    assert teacher.backend == "onnxruntime" and "scikit-learn" in teacher.backend_reason
    probs = teacher.predict(_batch(x))
    assert probs.dtype == torch.float32 and probs.shape == (100, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(100), atol=1e-5, rtol=0)
    expected = torch.from_numpy(zoo.forest.predict_proba(x).astype(np.float32))
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)
    sig = teacher.signature
    assert (sig.output_kind, sig.parameters) == ("probabilities", 0) and sig.bytes > 0
    assert teacher.hint_layers() == []
    with pytest.raises(TeacherIncompatible):
        teacher.predict_with_features(_batch(x[:4]), "probabilities")


def test_regressor_values(zoo: TeacherZoo, tmp_path: Path) -> None:
    teacher = _load(zoo.regressor_path, tmp_path)
    x = zoo.x[:64]
    out = teacher.predict(_batch(x))
    assert out.shape == (64, 1) and teacher.signature.output_kind == "values"
    expected = zoo.regressor.predict(x).astype(np.float32)
    np.testing.assert_allclose(out[:, 0].numpy(), expected, atol=1e-4, rtol=1e-4)


def test_float64_graph_takes_float32_batches(zoo: TeacherZoo, tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x64 = zoo.x[:400].astype(np.float64)
    model = LogisticRegression(max_iter=200).fit(x64, zoo.y[:400])
    path = tmp_path / "logreg64.onnx"
    onx = to_onnx(model, x64[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    teacher = _load(path, tmp_path)
    assert teacher.signature.inputs[0].dtype == "float64"
    out = teacher.predict(_batch(zoo.x[:20]))
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), model.predict_proba(x64[:20]), atol=1e-5)


# --------------------------------------------------------------------------- bundles


def test_zip_bundle_with_external_data_loads(zoo: TeacherZoo, tmp_path: Path) -> None:
    data = external_data(zoo.mlp_dynamo)
    bundle = zip_files(
        tmp_path / "mlp.zip",
        {f"model/{zoo.mlp_dynamo.name}": zoo.mlp_dynamo, f"model/{data.name}": data},
    )
    teacher = _load(bundle, tmp_path)
    assert teacher.digest == _sha256(bundle)
    expected = _reference(zoo.mlp, zoo.x[:10])
    torch.testing.assert_close(teacher.predict(_batch(zoo.x[:10])), expected, atol=1e-4, rtol=1e-4)
    teacher.prepare(_batch(zoo.x[:10]))
    assert teacher.backend == "torch"
    # The ORT path to hint features writes its graph copy beside the extracted data.
    layer = teacher.hint_layers()[0]
    assert teacher.predict_with_features(_batch(zoo.x[:3]), layer)[1].shape == (3, 64)


def test_unzipped_folder_loads(zoo: TeacherZoo, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    data = external_data(zoo.mlp_dynamo)
    for source in (zoo.mlp_dynamo, data):
        (folder / source.name).write_bytes(source.read_bytes())
    teacher = _load(folder, tmp_path)
    expected = _reference(zoo.mlp, zoo.x[:5])
    torch.testing.assert_close(teacher.predict(_batch(zoo.x[:5])), expected, atol=1e-4, rtol=1e-4)
    assert len(teacher.digest) == 64


def test_external_data_outside_the_bundle_is_refused(zoo: TeacherZoo, tmp_path: Path) -> None:
    bundle = escaping_bundle(zoo.mlp_dynamo, tmp_path / "escape.zip")
    # The file the location points at exists once extracted beside the bundle folder.
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "outside.bin").write_bytes(external_data(zoo.mlp_dynamo).read_bytes())
    with pytest.raises(ArchiveUnsafe):
        _load(bundle, tmp_path)


def test_escaping_member_is_refused(zoo: TeacherZoo, tmp_path: Path) -> None:
    bundle = zip_files(tmp_path / "evil.zip", {"model.onnx": zoo.mlp_legacy, "../x": b"x"})
    with pytest.raises(ArchiveUnsafe):
        _load(bundle, tmp_path)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- refusals


def test_pickles_and_torch_files_are_refused(tmp_path: Path) -> None:
    module = nn.Linear(4, 2)
    files = {"dict.pkl": tmp_path / "dict.pkl", "sd.pt": tmp_path / "sd.pt"}
    files["dict.pkl"].write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    torch.save(module.state_dict(), files["sd.pt"])
    files["ts.pt"] = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(module), files["ts.pt"])
    files["m.pt2"] = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(2, 4),)), files["m.pt2"])
    for name, path in files.items():
        with pytest.raises(UnsupportedFormat) as err:
            _load(path, tmp_path)
        assert "ONNX" in err.value.message or "safetensors" in err.value.message, name


def test_random_bytes_and_truncated_onnx(zoo: TeacherZoo, tmp_path: Path) -> None:
    noise = tmp_path / "noise"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    with pytest.raises(UnsupportedFormat):
        _load(noise, tmp_path)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(zoo.mlp_legacy.read_bytes()[:3000])
    with pytest.raises(TeacherInvalid):
        _load(truncated, tmp_path)


# --------------------------------------------------------------------------- safetensors


def _student_bundle(tmp_path: Path, zoo: TeacherZoo, name: str) -> tuple[Path, nn.Module]:
    """A student built and saved by the engine's own students and exporter, zipped."""
    from worker.engine.export import export_safetensors
    from worker.engine.spec import StudentSpec
    from worker.engine.students import StudentContext, build_student

    ctx = StudentContext(
        task="classification",
        modality="tabular",
        input_shape=(64,),
        input_names=["inputs"],
        output_dim=10,
        teacher_parameters=0,
        teacher_bytes=0,
    )
    torch.manual_seed(0)
    student = build_student(StudentSpec(architecture="mlp", hidden_sizes=[32]), ctx).eval()
    folder = tmp_path / name
    folder.mkdir()
    weights, config = export_safetensors(
        student, folder / "student.safetensors", folder / "student_config.json"
    )
    bundle = zip_files(tmp_path / f"{name}.zip", {weights.name: weights, config.name: config})
    return bundle, student


def test_safetensors_bundle_rebuilds_a_frozen_student(zoo: TeacherZoo, tmp_path: Path) -> None:
    bundle, student = _student_bundle(tmp_path, zoo, "student")
    teacher = _load(bundle, tmp_path)
    assert teacher.signature.format == "safetensors" and teacher.backend == "torch"
    assert teacher.digest == _sha256(bundle)
    assert teacher.module is not None and not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    batch = _batch(zoo.x[:12])
    with torch.no_grad():
        expected = student(**batch)
    out = teacher.predict(batch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    layers = teacher.hint_layers()
    assert layers == [student.hint_layer]
    _, features = teacher.predict_with_features(batch, layers[0])
    assert features.shape == (12, student.feature_dim)


def test_safetensors_weights_that_do_not_fit_are_invalid(zoo: TeacherZoo, tmp_path: Path) -> None:
    _student_bundle(tmp_path, zoo, "student")
    folder = tmp_path / "student"
    config = json.loads((folder / "student_config.json").read_text())
    config["hidden_sizes"] = [48]
    config.pop("weights")
    (folder / "student_config.json").write_text(json.dumps(config))
    wrong = zip_files(
        tmp_path / "wrong.zip",
        {
            "student.safetensors": folder / "student.safetensors",
            "student_config.json": folder / "student_config.json",
        },
    )
    with pytest.raises(TeacherInvalid):
        _load(wrong, tmp_path)
