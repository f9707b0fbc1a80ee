"""Whole runs of the engine on real teachers built here: quality, artifacts, CLI, guards."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tests.worker.engine.factories import (
    digits,
    export_onnx,
    random_sentences,
    run_engine_cli,
    sklearn_forest_onnx,
    sklearn_regressor_onnx,
    tiny_bert_config,
    tiny_bert_tokenizer,
    train_mlp_teacher,
    write_jsonl,
    write_npz,
    zip_folder,
)
from worker.engine.errors import DatasetInvalid, SpecInvalid, TeacherIncompatible
from worker.engine.evaluation import validate_metrics
from worker.engine.pipeline import run
from worker.engine.spec import (
    DataSpec,
    DistillationSpec,
    EvaluationSpec,
    ExportSpec,
    LossTerm,
    MethodSpec,
    StudentSpec,
    TrainingSpec,
)
from worker.engine.training import Callbacks

#: Minutes of real teachers and students: handed out first (see tests/conftest.py).
pytestmark = pytest.mark.slow

ARTIFACTS = {
    "student.onnx",
    "student.safetensors",
    "student_config.json",
    "metrics.json",
    "model_card.md",
    "training_curves.png",
}


@pytest.fixture(scope="module")
def split_digits() -> dict[str, np.ndarray]:
    """Digits split once: the teacher and transfer set see ``train``; ``test`` is held out."""
    x, y = digits()
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


@pytest.fixture(scope="module")
def mlp_teacher(
    tmp_path_factory: pytest.TempPathFactory, split_digits: dict[str, np.ndarray]
) -> Path:
    folder = tmp_path_factory.mktemp("mlp_teacher")
    module = train_mlp_teacher(split_digits["x"], split_digits["y"], epochs=40)
    return export_onnx(module, (torch.from_numpy(split_digits["x"][:2]),), folder / "teacher.onnx")


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    # A drop-in for a scikit-learn classifier gives its label first: take the scores.
    outputs = session.run(None, {name: x})
    return next(o for o in outputs if isinstance(o, np.ndarray) and o.dtype.kind == "f")


def training(**kw: Any) -> dict[str, Any]:
    return {"batch_size": 64, "learning_rate": 3e-3, "checkpoint_every_minutes": None, **kw}


def test_kd_student_keeps_the_teachers_accuracy_with_10x_fewer_parameters(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    data = write_npz(tmp_path / "transfer.npz", split_digits["x"], split_digits["y"])
    spec = DistillationSpec(
        student=StudentSpec(architecture="auto", compression=10),
        training=TrainingSpec(**training(epochs=60)),
        # The labels-only baseline runs by default on labelled data; this test is about kd.
        evaluation=EvaluationSpec(baseline=False),
    )
    result = run(spec, teacher_path=mlp_teacher, dataset_path=data, out_dir=tmp_path / "out")
    metrics = result.metrics
    validate_metrics(metrics)
    assert metrics["teacher"]["parameters"] >= 10 * metrics["student"]["parameters"]
    assert metrics["compression"] >= 10

    x_test, y_test = split_digits["x_test"], split_digits["y_test"]
    teacher_acc = (onnx_predict(mlp_teacher, x_test).argmax(1) == y_test).mean()
    student_acc = (
        onnx_predict(tmp_path / "out" / "student.onnx", x_test).argmax(1) == y_test
    ).mean()
    assert teacher_acc > 0.9
    assert student_acc >= teacher_acc - 0.03, (student_acc, teacher_acc)
    assert metrics["fidelity"]["agreement"] > 0.9


def test_kd_beats_labels_alone_when_only_10_percent_are_labeled(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    labels = split_digits["y"].copy()
    hidden = np.random.default_rng(1).permutation(len(labels))[: int(0.9 * len(labels))]
    labels[hidden] = -1
    data = write_npz(tmp_path / "partial.npz", split_digits["x"], labels)
    spec = DistillationSpec(
        student=StudentSpec(architecture="mlp", compression=10),
        training=TrainingSpec(**training(epochs=40)),
        evaluation=EvaluationSpec(baseline=True, validation_split=0.3),
    )
    result = run(spec, teacher_path=mlp_teacher, dataset_path=data, out_dir=tmp_path / "out")
    metrics = result.metrics
    validate_metrics(metrics)
    assert metrics["split"]["reference"] == "labels"
    assert metrics["baseline"]["parameters"] == metrics["student"]["parameters"]
    assert metrics["student"]["accuracy"] > metrics["baseline"]["accuracy"] + 0.02, metrics
    assert metrics["distillation_helped"] is True


def test_cli_runs_a_forest_teacher_end_to_end(
    tmp_path: Path, split_digits: dict[str, np.ndarray]
) -> None:
    _teacher, forest = sklearn_forest_onnx(
        split_digits["x"], split_digits["y"], tmp_path / "forest.onnx", zipmap=True
    )
    write_npz(tmp_path / "digits.npz", split_digits["x"])
    (tmp_path / "spec.json").write_text(
        json.dumps(
            {
                "teacher": {"path": "forest.onnx"},
                "dataset": {"path": "digits.npz"},
                "training": training(epochs=30),
            }
        )
    )
    out = tmp_path / "out"
    proc = run_engine_cli(tmp_path)
    summary = json.loads(proc.stdout)
    assert "step " in proc.stderr and "samples/s" in proc.stderr
    assert {p.name for p in out.iterdir()} >= ARTIFACTS
    for artifact in summary["artifacts"]:
        digest = hashlib.sha256((out / artifact["name"]).read_bytes()).hexdigest()
        assert artifact["sha256"] == digest
    metrics = json.loads((out / "metrics.json").read_text())
    validate_metrics(metrics)
    assert metrics["teacher"]["parameters"] == 0
    assert metrics["compression_basis"] == "bytes"
    # No labels in the transfer set: the teacher's predictions are the reference.
    assert metrics["split"]["reference"] == "teacher"
    # The drop-in student answers as the teacher file does: labels, then a ZipMap of maps.
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [o.type for o in session.get_outputs()] == [
        "tensor(int64)",
        "seq(map(int64,tensor(float)))",
    ]
    labels = session.run(None, {session.get_inputs()[0].name: split_digits["x_test"]})[0]
    student_acc = (labels == split_digits["y_test"]).mean()
    forest_acc = (forest.predict(split_digits["x_test"]) == split_digits["y_test"]).mean()
    assert student_acc >= forest_acc - 0.05, (student_acc, forest_acc)


def test_cli_reports_bad_input_with_the_field(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(
        json.dumps({"teacher": {"path": "t"}, "dataset": {"path": "d"}, "training": {"epochs": -1}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "worker.engine", "run", "spec.json", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "spec_invalid" in proc.stderr and "training.epochs" in proc.stderr


def test_regression_teacher_gets_regression_metrics(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = (x[:, 0] * 2 + np.sin(x[:, 1]) + 0.1 * rng.normal(size=600)).astype(np.float32)
    teacher, _ = sklearn_regressor_onnx(x, y, tmp_path / "gbr.onnx")
    data = write_npz(tmp_path / "reg.npz", x, y)
    spec = DistillationSpec(
        training=TrainingSpec(**training(epochs=30)), student=StudentSpec(architecture="mlp")
    )
    result = run(spec, teacher_path=teacher, dataset_path=data, out_dir=tmp_path / "out")
    metrics = result.metrics
    validate_metrics(metrics)
    assert metrics["task"] == "regression"
    assert {"mae", "mse", "r2"} <= set(metrics["student"])
    assert metrics["teacher"]["r2"] > 0.8
    assert metrics["student"]["r2"] > 0.6


def test_cache_reuses_teacher_outputs_across_runs(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    data = write_npz(tmp_path / "t.npz", split_digits["x"][:300])
    spec = DistillationSpec(training=TrainingSpec(**training(epochs=2)))
    stages: list[dict[str, Any]] = []
    cb = Callbacks(on_event=lambda kind, d: stages.append(d) if kind == "stage" else None)
    cache = tmp_path / "cache"
    first = run(
        spec, teacher_path=mlp_teacher, dataset_path=data, out_dir=tmp_path / "a", cache_dir=cache
    )
    second = run(
        spec,
        teacher_path=mlp_teacher,
        dataset_path=data,
        out_dir=tmp_path / "b",
        cache_dir=cache,
        callbacks=cb,
    )
    cached = [s["cached"] for s in stages if "cached" in s]
    assert cached and all(cached)
    assert first.metrics["student"]["accuracy"] == second.metrics["student"]["accuracy"]


def test_online_and_hint_methods_train(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    data = write_npz(tmp_path / "t.npz", split_digits["x"][:400], split_digits["y"][:400])
    rows: list[dict[str, Any]] = []
    spec = DistillationSpec(
        method=MethodSpec(
            teacher_outputs="online", extra_terms=[LossTerm(name="hint", weight=0.5)]
        ),
        training=TrainingSpec(**training(epochs=15)),
    )
    result = run(
        spec,
        teacher_path=mlp_teacher,
        dataset_path=data,
        out_dir=tmp_path / "out",
        callbacks=Callbacks(on_progress=rows.append),
    )
    assert {"loss/soft", "loss/hard", "loss/hint"} <= set(rows[-1])
    assert result.metrics["student"]["accuracy"] > 0.5


def test_time_budget_gives_a_partial_evaluated_student(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    data = write_npz(tmp_path / "t.npz", split_digits["x"][:300])
    spec = DistillationSpec(training=TrainingSpec(**training(epochs=10_000, max_minutes=0.01)))
    result = run(spec, teacher_path=mlp_teacher, dataset_path=data, out_dir=tmp_path / "out")
    assert result.partial and result.stop_reason == "time_budget"
    assert result.metrics["partial"] is True
    assert {p.name for p in (tmp_path / "out").iterdir()} >= ARTIFACTS


def test_refuses_data_that_does_not_fit_the_teacher(tmp_path: Path, mlp_teacher: Path) -> None:
    data = write_npz(tmp_path / "wide.npz", np.zeros((50, 32), np.float32))
    with pytest.raises(DatasetInvalid, match=r"shape \[32\]"):
        run(DistillationSpec(), teacher_path=mlp_teacher, dataset_path=data, out_dir=tmp_path / "o")


def test_refuses_baseline_without_labels(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    data = write_npz(tmp_path / "nolabels.npz", split_digits["x"][:100])
    spec = DistillationSpec(evaluation=EvaluationSpec(baseline=True))
    with pytest.raises(SpecInvalid) as info:
        run(spec, teacher_path=mlp_teacher, dataset_path=data, out_dir=tmp_path / "o")
    assert info.value.field == "evaluation.baseline"


def test_refuses_classification_on_a_regressor(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    teacher, _ = sklearn_regressor_onnx(x, x[:, 0], tmp_path / "gbr.onnx")
    data = write_npz(tmp_path / "d.npz", x)
    with pytest.raises(TeacherIncompatible) as info:
        run(
            DistillationSpec(task="classification"),
            teacher_path=teacher,
            dataset_path=data,
            out_dir=tmp_path / "o",
        )
    assert info.value.field == "task"


def test_engine_imports_nothing_from_the_service() -> None:
    code = (
        "import sys, worker.engine.pipeline, worker.engine.cli, worker.engine.hf; "
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'celery', 'app') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def text_teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT sequence classifier and a sentence-transformers encoder, zipped."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_modules
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("text")
    tok = tiny_bert_tokenizer(root)
    torch.manual_seed(0)
    clf_dir = root / "clf"
    config = tiny_bert_config(num_labels=3, max_position_embeddings=24)
    BertForSequenceClassification(config).save_pretrained(clf_dir)
    tok.save_pretrained(clf_dir)
    enc_dir = root / "encoder"
    BertModel(tiny_bert_config()).save_pretrained(enc_dir)
    tok.save_pretrained(enc_dir)
    st = SentenceTransformer(
        modules=[
            st_modules.Transformer(str(enc_dir)),
            st_modules.Pooling(32, "mean"),
            st_modules.Normalize(),
        ],
        device="cpu",
    )
    st_dir = root / "sentence"
    st.save(str(st_dir))
    return {
        "classifier": zip_folder(clf_dir, root / "clf.zip"),
        "sentence": zip_folder(st_dir, root / "sentence.zip"),
    }


def test_text_classifier_distils_to_a_layer_subset_student(
    tmp_path: Path, text_teachers: dict[str, Path]
) -> None:
    texts = random_sentences(300)
    data = write_jsonl(tmp_path / "t.jsonl", texts)
    spec = DistillationSpec(
        student=StudentSpec(num_layers=2),
        training=TrainingSpec(**training(epochs=3, batch_size=32)),
        # Past the classifier's 24 positions: clamped, with a warning.
        data=DataSpec(max_length=40),
    )
    events: list[tuple[str, dict[str, Any]]] = []
    result = run(
        spec,
        teacher_path=text_teachers["classifier"],
        dataset_path=data,
        out_dir=tmp_path / "out",
        callbacks=Callbacks(on_event=lambda kind, d: events.append((kind, d))),
    )
    assert any(d.get("code") == "max_length_clamped" for kind, d in events if kind == "warning")
    validate_metrics(result.metrics)
    config = json.loads((tmp_path / "out" / "student_config.json").read_text())
    assert config["architecture"] == "hf_encoder"
    assert config["initialised_from_teacher_layers"] == [0, 3]
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"))
    names = [i.name for i in session.get_inputs()]
    assert names[:2] == ["input_ids", "attention_mask"]
    ids = np.full((3, 10), 5, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    assert session.run(None, feeds)[0].shape == (3, 3)


def test_sentence_embeddings_distil_to_a_narrower_student_with_projection(
    tmp_path: Path, text_teachers: dict[str, Path]
) -> None:
    data = write_jsonl(tmp_path / "t.jsonl", random_sentences(400, seed=1))
    spec = DistillationSpec(
        student=StudentSpec(architecture="transformer", hidden_size=16, num_layers=1, num_heads=2),
        training=TrainingSpec(**training(epochs=8, batch_size=32)),
        data=DataSpec(max_length=16),
    )
    result = run(
        spec, teacher_path=text_teachers["sentence"], dataset_path=data, out_dir=tmp_path / "out"
    )
    metrics = result.metrics
    validate_metrics(metrics)
    assert metrics["task"] == "embedding"
    assert metrics["student"]["cosine"] > 0.8
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"))
    ids = np.full((2, 12), 7, dtype=np.int64)
    feeds = {
        i.name: ids if i.name == "input_ids" else np.ones_like(ids) for i in session.get_inputs()
    }
    # The student is 16 wide; its projection head gives the teacher's 32-wide embedding.
    assert session.run(None, feeds)[0].shape == (2, 32)


def _from_scratch(
    tmp_path: Path, teacher: Path, student: StudentSpec, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A one-epoch job on the tiny sentence teacher with ``student``: the student's config
    and the one ``student_from_scratch`` warning it sent."""
    data = write_jsonl(tmp_path / "t.jsonl", random_sentences(120, seed=seed))
    events: list[tuple[str, dict[str, Any]]] = []
    run(
        DistillationSpec(
            student=student,
            training=TrainingSpec(**training(epochs=1, batch_size=32)),
            data=DataSpec(max_length=12),
            evaluation=EvaluationSpec(baseline=False),
            # What is asserted is the design: no ONNX export to wait for.
            export=ExportSpec(formats=["safetensors"]),
        ),
        teacher_path=teacher,
        dataset_path=data,
        out_dir=tmp_path / "out",
        callbacks=Callbacks(on_event=lambda kind, d: events.append((kind, d))),
    )
    config = json.loads((tmp_path / "out" / "student_config.json").read_text())
    (warning,) = [
        d for kind, d in events if kind == "warning" and d["code"] == "student_from_scratch"
    ]
    return config, warning


def test_a_student_that_cannot_start_from_the_teacher_says_so_and_names_the_compression(
    tmp_path: Path, text_teachers: dict[str, Path]
) -> None:
    config, warning = _from_scratch(
        tmp_path, text_teachers["sentence"], StudentSpec(compression=6), seed=2
    )
    # A sixth of this teacher has no room for one 32-wide layer, nor for one cut to a head
    # of 8 channels with word embeddings of rank 16: narrower, from scratch.
    assert config["initialised_from_teacher_layers"] is None
    assert config["hf_config"]["hidden_size"] < 32
    assert warning["field"] == "student.compression"
    largest = warning["largest_compression_from_teacher"]
    # A quarter of it still fits a student cut to two of its heads.
    assert 4 < largest < 6 and f"at most {largest:.1f}" in warning["message"]


def test_an_asked_width_that_cannot_be_cut_from_the_teacher_says_what_can(
    tmp_path: Path, text_teachers: dict[str, Path]
) -> None:
    # 12 wide is not whole heads of the teacher's 8-wide ones.
    asked = StudentSpec(hidden_size=12, num_layers=1, compression=None)
    config, warning = _from_scratch(tmp_path, text_teachers["sentence"], asked, seed=4)
    assert config["initialised_from_teacher_layers"] is None
    # It names the field asked for and what would be cut, not a compression.
    assert warning["field"] == "student.hidden_size"
    assert "12 wide" in warning["message"] and "a multiple of 8 below 32" in warning["message"]
    assert "compression" not in warning["message"]


#: An upper bound on the student below the tiny sentence teacher's 54,000 or so parameters:
#: ``auto`` designs its top rung to it, and the teacher's layers fit well below it.
TEXT_LADDER_MAX_PARAMETERS = 36_000


def test_a_sentence_encoders_ladder_climbs_students_cut_from_it_smallest_first(
    tmp_path: Path, text_teachers: dict[str, Path]
) -> None:
    # A random-weight teacher: this is the ladder's plumbing; the MiniLM tests show the quality.
    data = write_jsonl(tmp_path / "t.jsonl", random_sentences(400, seed=3))
    events: list[tuple[str, dict[str, Any]]] = []

    def keep(kind: str, data: dict[str, Any]) -> None:
        # Copied as sent: a worker writes each event out when it comes.
        events.append((kind, json.loads(json.dumps(data))))

    result = run(
        DistillationSpec(
            # A latency no rung meets, so that every rung is trained and the best one kept.
            student=StudentSpec(max_parameters=TEXT_LADDER_MAX_PARAMETERS, max_latency_ms=1e-6),
            # epochs stay "auto", as a ladder needs; the steps are capped to keep it short.
            training=TrainingSpec(max_steps=40, batch_size=32),
            data=DataSpec(max_length=12),
            evaluation=EvaluationSpec(validation_split=0.3, baseline=False),
        ),
        teacher_path=text_teachers["sentence"],
        dataset_path=data,
        out_dir=tmp_path / "out",
        callbacks=Callbacks(on_event=keep),
    )
    metrics = result.metrics
    validate_metrics(metrics)
    assert metrics["teacher"]["parameters"] / TEXT_LADDER_MAX_PARAMETERS > 1.4
    section = metrics["ladder"]
    assert section is not None and section["knob"] == "encoder"
    rungs = section["rungs"]
    # Every planned rung was trained (none met the bar), smallest first, each a student of
    # the teacher's family at most as wide as it; the smallest ones are cut narrower.
    assert [rung["encoder"] for rung in rungs] == section["planned"]
    assert len(rungs) >= 3 and section["stopped"] == "all_rungs"
    sizes = [rung["parameters"] for rung in rungs]
    assert sizes == sorted(set(sizes)) and sizes[-1] <= TEXT_LADDER_MAX_PARAMETERS
    assert all(rung["encoder"][1] <= 32 for rung in rungs) and rungs[0]["encoder"][1] < 32
    assert not any(d.get("code") == "student_from_scratch" for _, d in events)
    assert section["met_criteria"] is False
    assert any(d.get("code") == "ladder_criteria_unmet" for kind, d in events if kind == "warning")
    # The chosen rung is the student the job exported, started from the teacher's layers.
    chosen = rungs[section["chosen"]]
    out = tmp_path / "out"
    config = json.loads((out / "student_config.json").read_text())
    hf_config = config["hf_config"]
    assert chosen["encoder"] == [
        hf_config["num_hidden_layers"],
        hf_config["hidden_size"],
        hf_config["intermediate_size"],
    ]
    assert config["initialised_from_teacher_layers"] is not None
    assert metrics["student"]["parameters"] == chosen["parameters"]
    assert "| layers × width × units |" in (out / "model_card.md").read_text()
    assert (out / "student_ladder.png").stat().st_size > 0
    # The final evaluation event holds what metrics.json holds, the ladder included.
    (final,) = [d["metrics"] for kind, d in events if kind == "evaluation" and d.get("final")]
    written = json.loads((out / "metrics.json").read_text())
    for key in ("ladder", "verdict", "provenance", "deployed_file", "student"):
        assert final[key] == written[key], key


def test_cnn_teacher_on_images_distils_to_a_cnn_student(
    tmp_path: Path, split_digits: dict[str, np.ndarray]
) -> None:
    from tests.worker.engine.factories import SmallCNN

    images = split_digits["x"].reshape(-1, 1, 8, 8)
    cnn = SmallCNN.train(images, split_digits["y"], epochs=8)
    teacher = export_onnx(cnn, (torch.from_numpy(images[:2]),), tmp_path / "cnn.onnx")
    data = write_npz(tmp_path / "images.npz", images, split_digits["y"])
    spec = DistillationSpec(
        training=TrainingSpec(**training(epochs=15)), export=ExportSpec(quantize=["int8"])
    )
    result = run(spec, teacher_path=teacher, dataset_path=data, out_dir=tmp_path / "out")
    config = json.loads((tmp_path / "out" / "student_config.json").read_text())
    assert config["architecture"] == "cnn"
    assert result.metrics["teacher"]["parameters"] >= 10 * result.metrics["student"]["parameters"]
    test_images = split_digits["x_test"].reshape(-1, 1, 8, 8)
    student_acc = (
        onnx_predict(tmp_path / "out" / "student.onnx", test_images).argmax(1)
        == split_digits["y_test"]
    ).mean()
    assert student_acc > 0.85
    # The int8 CNN is quantized statically (QDQ, calibrated on training rows) and keeps
    # the fp32 student's accuracy on the held-out images.
    int8_path = tmp_path / "out" / "student.int8.onnx"
    int8_acc = (onnx_predict(int8_path, test_images).argmax(1) == split_digits["y_test"]).mean()
    assert abs(int8_acc - student_acc) <= 0.02
    int8 = result.metrics["quantized"]["int8"]
    assert int8["method"] == "static"
    assert int8["file_bytes"] == int8_path.stat().st_size
    assert {n.op_type for n in onnx.load(int8_path).graph.node} >= {"QuantizeLinear", "Conv"}


def test_an_interrupted_job_resumes_to_the_same_student(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    from worker.engine.errors import Cancelled

    data = write_npz(tmp_path / "t.npz", split_digits["x"][:500], split_digits["y"][:500])
    spec = DistillationSpec(training=TrainingSpec(**training(epochs=6, checkpoint_every_steps=5)))
    whole = run(
        spec,
        teacher_path=mlp_teacher,
        dataset_path=data,
        out_dir=tmp_path / "whole",
        checkpoint_dir=tmp_path / "ckpt-whole",
    )
    calls = {"n": 0, "training": 0}

    def note_stage(kind: str, data: dict[str, Any]) -> None:
        if kind == "stage":
            calls["training"] = int(data.get("stage") == "training")

    def stop_at_step_17() -> bool:
        # The teacher pass asks too; the training loop asks once before each step.
        calls["n"] += calls["training"]
        return calls["n"] > 17

    # Without cancel_keeps_student a cancellation is an interruption: Cancelled, to be resumed.
    with pytest.raises(Cancelled):
        run(
            spec,
            teacher_path=mlp_teacher,
            dataset_path=data,
            out_dir=tmp_path / "resumed",
            checkpoint_dir=tmp_path / "ckpt",
            callbacks=Callbacks(on_event=note_stage, should_cancel=stop_at_step_17),
        )
    resumed = run(
        spec,
        teacher_path=mlp_teacher,
        dataset_path=data,
        out_dir=tmp_path / "resumed",
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert resumed.resumed_from == 17
    assert resumed.steps == whole.steps
    from safetensors.numpy import load_file

    whole_w, resumed_w = (
        load_file(tmp_path / d / "student.safetensors") for d in ("whole", "resumed")
    )
    assert whole_w.keys() == resumed_w.keys()
    for name, value in whole_w.items():
        np.testing.assert_array_equal(value, resumed_w[name], err_msg=name)
    for key in ("accuracy", "f1_macro"):
        assert resumed.metrics["student"][key] == whole.metrics["student"][key]
    assert resumed.metrics["fidelity"] == whole.metrics["fidelity"]


def cancel_after(steps: int) -> tuple[Callable[[str, dict[str, Any]], None], Callable[[], bool]]:
    """(on_event, should_cancel) that ask the run to stop before training step ``steps`` + 1."""
    calls = {"n": 0, "training": 0}

    def note_stage(kind: str, data: dict[str, Any]) -> None:
        if kind == "stage":
            calls["training"] = int(data.get("stage") == "training")

    def should_cancel() -> bool:
        # The teacher pass asks too; the training loop asks once before each step.
        calls["n"] += calls["training"]
        return calls["n"] > steps

    return note_stage, should_cancel


def test_a_cancellation_that_keeps_the_student_exports_the_best_validated_one(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    data = write_npz(tmp_path / "t.npz", split_digits["x"][:500], split_digits["y"][:500])
    # Without mixed rows an epoch is a few steps: validated before the cancellation at step 8.
    spec = DistillationSpec(training=TrainingSpec(**training(epochs=6)), method=MethodSpec(mixup=0))
    note_stage, should_cancel = cancel_after(8)
    result = run(
        spec,
        teacher_path=mlp_teacher,
        dataset_path=data,
        out_dir=tmp_path / "out",
        checkpoint_dir=tmp_path / "ckpt",
        callbacks=Callbacks(
            on_event=note_stage, should_cancel=should_cancel, cancel_keeps_student=lambda: True
        ),
    )
    assert result.stop_reason == "cancelled" and result.partial and result.steps == 8
    metrics = result.metrics
    validate_metrics(metrics)
    assert metrics["partial"] is True and metrics["training"]["stop_reason"] == "cancelled"
    assert metrics["cancelled_during"] == "training" and metrics["evaluated"] is True
    # Evaluated, but a cancelled job's student is never declared deployable.
    assert metrics["verdict"]["deployable"] is False and result.deployable is False
    assert "cancelled" in metrics["verdict"]["reasons"][0]
    # Validated at the end of the first epoch, then trained two steps more.
    best_step = metrics["training"]["best_step"]
    assert best_step is not None and 0 < best_step < 8
    assert metrics.get("baseline") is None  # the transfer set is labelled: cancelled, not run
    assert {p.name for p in (tmp_path / "out").iterdir()} >= ARTIFACTS
    assert "cancelled" in (tmp_path / "out" / "model_card.md").read_text()

    # The exported weights are the best validated ones, not those of the last step.
    from safetensors.numpy import load_file

    checkpoint = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text().strip()
    exported = load_file(tmp_path / "out" / "student.safetensors")
    best, last = (load_file(checkpoint / f) for f in ("best.safetensors", "student.safetensors"))
    assert exported.keys() == best.keys()
    for name, value in exported.items():
        np.testing.assert_array_equal(value, best[name], err_msg=name)
    assert any(not np.array_equal(value, last[name]) for name, value in exported.items())

    outputs = onnx_predict(tmp_path / "out" / "student.onnx", split_digits["x_test"])
    assert outputs.shape == (len(split_digits["x_test"]), 10) and np.isfinite(outputs).all()


def _cancelled_from_stage(
    spec: DistillationSpec, teacher: Path, data: Path, out: Path, stage: str
) -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
    """The run, cancelled (keeping its student) from its ``stage`` event on, and its events."""
    events: list[tuple[str, dict[str, Any]]] = []
    now = {"stage": ""}

    def note(kind: str, data: dict[str, Any]) -> None:
        events.append((kind, data))
        if kind == "stage":
            now["stage"] = str(data.get("stage"))

    result = run(
        spec,
        teacher_path=teacher,
        dataset_path=data,
        out_dir=out,
        callbacks=Callbacks(
            on_event=note,
            should_cancel=lambda: now["stage"] == stage,
            cancel_keeps_student=lambda: True,
        ),
    )
    return result, events


def test_a_cancellation_during_the_baseline_keeps_the_student_without_it(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    data = write_npz(tmp_path / "t.npz", split_digits["x"][:300], split_digits["y"][:300])
    spec = DistillationSpec(
        training=TrainingSpec(**training(epochs=2)), evaluation=EvaluationSpec(baseline=True)
    )
    result, _ = _cancelled_from_stage(spec, mlp_teacher, data, tmp_path / "out", "baseline")
    assert result.stop_reason == "cancelled" and result.partial
    assert result.metrics["partial"] is True and result.metrics.get("baseline") is None
    assert result.metrics["cancelled_during"] == "baseline" and not result.deployable
    assert {p.name for p in (tmp_path / "out").iterdir()} >= ARTIFACTS


@pytest.mark.parametrize("stage", ["export", "evaluation"])
def test_a_cancellation_after_training_keeps_the_student_unevaluated(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray], stage: str
) -> None:
    data = write_npz(tmp_path / "t.npz", split_digits["x"][:300], split_digits["y"][:300])
    spec = DistillationSpec(
        training=TrainingSpec(**training(epochs=2)),
        evaluation=EvaluationSpec(baseline=False),
        export=ExportSpec(quantize=["int8"]),
    )
    # Asked for from the stage on: training ran to its end before.
    result, events = _cancelled_from_stage(spec, mlp_teacher, data, tmp_path / "out", stage)
    stages = [d["stage"] for kind, d in events if kind == "stage"]
    assert stages[-1] == stage, stages
    assert result.stop_reason == "cancelled" and result.partial and not result.deployable
    metrics = result.metrics
    validate_metrics(metrics)
    assert metrics == json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["evaluated"] is False and metrics["cancelled_during"] == stage
    assert metrics["partial"] is True and metrics["training"]["stop_reason"] == "cancelled"
    assert metrics["training"]["steps"] == result.steps > 0
    # Nothing measured on the test rows is reported, not even what was measured in time.
    assert not {"teacher", "student", "fidelity", "speedup", "intervals"} & metrics.keys()
    assert not any(kind == "evaluation" and d.get("final") for kind, d in events)
    verdict = metrics["verdict"]
    assert verdict["deployable"] is False and f"during its {stage}" in verdict["reasons"][0]
    assert all(c["met"] is None for c in verdict["criteria"].values()) and verdict["criteria"]

    # The export that was running finished: every file is whole and runs.
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= ARTIFACTS | {"student.int8.onnx"}
    for name in ("student.onnx", "student.int8.onnx"):
        outputs = onnx_predict(out / name, split_digits["x_test"])
        assert outputs.shape == (len(split_digits["x_test"]), 10) and np.isfinite(outputs).all()
    from safetensors.numpy import load_file

    assert load_file(out / "student.safetensors")
    card = (out / "model_card.md").read_text()
    assert "Verdict: **not deployable**" in card and f"cancelled during the {stage}" in card
    assert "Not evaluated" in card and "| metric |" not in card


def test_a_cancellation_before_any_validation_leaves_no_student(
    tmp_path: Path, mlp_teacher: Path, split_digits: dict[str, np.ndarray]
) -> None:
    from worker.engine.errors import Cancelled

    data = write_npz(tmp_path / "t.npz", split_digits["x"][:500], split_digits["y"][:500])
    spec = DistillationSpec(training=TrainingSpec(**training(epochs=6)))
    note_stage, should_cancel = cancel_after(2)
    with pytest.raises(Cancelled):
        run(
            spec,
            teacher_path=mlp_teacher,
            dataset_path=data,
            out_dir=tmp_path / "out",
            callbacks=Callbacks(
                on_event=note_stage, should_cancel=should_cancel, cancel_keeps_student=lambda: True
            ),
        )
    assert not (tmp_path / "out" / "student.onnx").exists()


def test_a_teacher_with_a_hidden_softmax_is_read_in_log_space(
    tmp_path: Path, split_digits: dict[str, np.ndarray]
) -> None:
    class HiddenSoftmax(torch.nn.Module):
        """Probabilities written out as exp / sum, so the graph has no Softmax node."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.net(x)
            e = torch.exp(z - z.max(dim=1, keepdim=True).values)
            return e / e.sum(dim=1, keepdim=True)

    net = train_mlp_teacher(split_digits["x"], split_digits["y"], hidden=(64,), epochs=10)
    teacher = export_onnx(
        HiddenSoftmax(net), (torch.from_numpy(split_digits["x"][:2]),), tmp_path / "p.onnx"
    )
    # Test rows now come off the transfer set too: 1000 rows leave 750 to train on.
    data = write_npz(tmp_path / "t.npz", split_digits["x"][:1000])
    events: list[tuple[str, dict[str, Any]]] = []
    result = run(
        DistillationSpec(
            student=StudentSpec(compression=2), training=TrainingSpec(**training(epochs=20))
        ),
        teacher_path=teacher,
        dataset_path=data,
        out_dir=tmp_path / "out",
        callbacks=Callbacks(on_event=lambda kind, d: events.append((kind, d))),
    )
    warnings = [d for kind, d in events if kind == "warning"]
    assert any(w["code"] == "teacher_outputs_probabilities" for w in warnings)
    # On ~150 test rows nobody chose on, the 95% interval is about ±0.05 wide.
    assert result.metrics["fidelity"]["agreement"] > 0.8
