"""The student ladder: ``auto`` students sized by evidence on the validation rows.

The end-to-end tests distil a fully trained random forest (skl2onnx) on rows it never
saw, and score the exported ``student.onnx`` and the teacher in onnxruntime on
held-out rows that neither training nor any choice used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tests.worker.engine.factories import run_engine_cli, sklearn_forest_onnx, write_npz
from worker.engine import ladder
from worker.engine.evaluation import (
    FIDELITY_KEYS,
    OnnxFile,
    build_metrics,
    paired_latency_ms,
    validate_metrics,
)
from worker.engine.pipeline import run
from worker.engine.report import plot_student_ladder, write_model_card
from worker.engine.spec import DistillationSpec
from worker.engine.training import Callbacks

# --------------------------------------------------------------------------- decisions


def test_rung_widths_are_geometric_distinct_and_end_at_the_auto_width() -> None:
    assert ladder.rung_widths(700) == [8, 24, 75, 229, 700]
    # A narrow top gets fewer rungs, each at least 1.5 times the one below.
    assert ladder.rung_widths(12) == [8, 12]
    assert ladder.rung_widths(11) == [11]
    assert ladder.rung_widths(9, smallest=4) == [4, 6, 9]
    assert ladder.rung_widths(40) == [8, 14, 23, 40]
    assert ladder.rung_widths(8) == [8]
    assert ladder.rung_widths(5) == [5]


def test_rung_sizes_keep_the_shape_auto_designs() -> None:
    assert ladder.rung_sizes("mlp", 24, 2) == [24, 24]
    assert ladder.rung_sizes("cnn", 6, 3) == [6, 12, 24]
    assert ladder.top_width({"architecture": "mlp", "hidden_sizes": [64, 64]}) == 64
    assert ladder.top_width({"architecture": "cnn", "channels": [16, 32, 64]}) == 16
    # Shapes a ladder does not vary: unequal widths, channels that do not double, others.
    assert ladder.top_width({"architecture": "mlp", "hidden_sizes": [64, 32]}) is None
    assert ladder.top_width({"architecture": "cnn", "channels": [16, 16]}) is None
    assert ladder.top_width({"architecture": "rnn", "hidden_size": 64}) is None


def test_an_encoders_rungs_are_geometric_compressions_from_the_largest_down_to_the_auto_one() -> (
    None
):
    # all-MiniLM-L6-v2: students start from its layers up to 42.7x; auto designs 10x.
    assert ladder.rung_compressions(10.0, 42.7) == [42.7, 26.31, 16.22, 10.0]
    # Five rungs at most, each at least 1.5 times the next.
    assert ladder.rung_compressions(1.5, 60.0) == [60.0, 23.85, 9.48, 3.77, 1.5]
    assert ladder.rung_compressions(10.0, 15.0) == [15.0, 10.0]
    assert ladder.rung_compressions(10.0, 14.9) == [10.0]
    # Past the largest (auto's student starts from random weights), no ladder.
    assert ladder.rung_compressions(20.0, 14.3) == [20.0]
    config = {
        "architecture": "hf_encoder",
        "hf_config": {
            "model_type": "bert",
            "num_hidden_layers": 1,
            "hidden_size": 160,
            "intermediate_size": 640,
        },
    }
    assert ladder.rung_size(config, "encoder") == [1, 160, 640]
    # DistilBERT's config, as transformers writes it, keeps its own names.
    distilbert = {"model_type": "distilbert", "n_layers": 2, "dim": 384, "hidden_dim": 1536}
    distilbert.update(hidden_size=None, num_hidden_layers=None, intermediate_size=None)
    assert ladder.rung_size({"hf_config": distilbert}, "encoder") == [2, 384, 1536]
    assert ladder.rung_size({"hidden_sizes": [64, 64]}, "hidden_sizes") == [64, 64]


def test_applies_to_auto_tabular_and_image_students_without_an_asked_size() -> None:
    def spec(**student: Any) -> DistillationSpec:
        return DistillationSpec.model_validate({"student": student})

    assert ladder.applies(spec(), "tabular", online=False)
    # max_parameters is an upper bound: it caps the top rung and keeps the ladder.
    assert ladder.applies(spec(max_parameters=5000), "tabular", online=False)
    # A spec the API stored comes back with every field set: the default compression
    # still climbs, another asks for one size, and ladder false turns it off.
    stored = DistillationSpec.model_validate(spec().model_dump())
    assert "compression" in stored.student.model_fields_set
    assert ladder.applies(stored, "tabular", online=False)
    assert not ladder.applies(spec(compression=4), "tabular", online=False)
    assert not ladder.applies(spec(ladder=False), "tabular", online=False)
    assert not ladder.applies(spec(hidden_sizes=[32, 32]), "tabular", online=False)
    assert not ladder.applies(spec(architecture="mlp"), "tabular", online=False)
    assert ladder.applies(spec(), "image", online=False)
    assert not ladder.applies(spec(channels=[8, 16]), "image", online=False)
    # A transformers teacher's auto student: a ladder of compressions, each started from the
    # teacher's layers with its whole vocabulary, unless a size or a random start is asked for.
    assert ladder.applies(spec(), "text", online=False)
    assert ladder.applies(spec(max_parameters=5_000_000), "text", online=False)
    for asked in ({"num_layers": 2}, {"hidden_size": 192}, {"num_heads": 6}):
        assert not ladder.applies(spec(**asked), "text", online=False)
        # They are a transformer's fields: a tabular ladder reads none of them.
        assert ladder.applies(spec(**asked), "tabular", online=False)
    assert not ladder.applies(spec(init_from_teacher=False), "text", online=False)
    assert not ladder.applies(spec(vocabulary="transfer"), "text", online=False)
    assert not ladder.applies(spec(), "tabular", online=True)
    explicit_epochs = DistillationSpec.model_validate({"training": {"epochs": 30}})
    assert not ladder.applies(explicit_epochs, "tabular", online=False)
    # Too few validation rows to tell the rungs apart.
    assert not ladder.applies(spec(), "tabular", online=False, validation_rows=40)


def _rung(met: bool, fidelity: float) -> dict[str, Any]:
    return {"met_criteria": met, "validation": {"fidelity": {"value": fidelity}}}


def test_choose_takes_the_smallest_that_met_else_the_best_fidelity() -> None:
    assert ladder.choose("classification", [_rung(False, 0.9), _rung(True, 0.96)]) == 1
    assert ladder.choose("classification", [_rung(True, 0.95), _rung(True, 0.99)]) == 0
    none_met = [_rung(False, 0.9), _rung(False, 0.94), _rung(False, 0.94), _rung(False, 0.93)]
    assert ladder.choose("classification", none_met) == 1


def test_a_rung_whose_int8_file_alone_met_the_criteria_is_chosen_as_int8() -> None:
    def rung(met: bool, fidelity: float, int8: bool | None) -> dict[str, Any]:
        judged = {"int8": None if int8 is None else {"met_criteria": int8}}
        return {**_rung(met, fidelity), **judged}

    rungs = [rung(False, 0.9, False), rung(False, 0.95, True), rung(True, 0.97, True)]
    assert ladder.choose("classification", rungs) == 1
    assert [ladder.precision(r) for r in rungs] == ["fp32", "int8", "fp32"]
    assert ladder.met(rungs[1]) and not ladder.met(rungs[0])
    # A rung whose int8 file could not be written is judged on its fp32 file alone.
    assert ladder.choose("classification", [rung(False, 0.9, None), rungs[2]]) == 1


def test_the_verdict_is_the_int8_files_when_the_ladder_chose_it() -> None:
    from worker.engine.pipeline import _deployed_file

    int8_verdict = {"deployable": True, "reasons": ["met: x"], "criteria": {}}
    fp32_verdict = {"deployable": False, "reasons": ["missed: x"], "criteria": {}}

    def metrics(precision: str, entry: Any) -> dict[str, Any]:
        return {
            "evaluated": True,
            "verdict": fp32_verdict,
            "quantized": {"int8": entry},
            "ladder": {**_section(), "chosen_precision": precision},
        }

    chosen = metrics("int8", {"verdict": int8_verdict})
    assert _deployed_file(chosen) == "student.int8.onnx"
    assert chosen["verdict"]["deployable"] is True
    assert chosen["verdict"]["reasons"][0].startswith("judged on student.int8.onnx")
    assert chosen["verdict"]["reasons"][1:] == ["met: x"]
    for kept in (metrics("fp32", {"verdict": int8_verdict}), metrics("int8", None)):
        assert _deployed_file(kept) == "student.onnx" and kept["verdict"] == fp32_verdict


def test_small_rungs_take_a_lower_floor_of_steps_the_top_the_usual() -> None:
    assert ladder.rung_min_steps(2_000, top=False) == ladder.MIN_RUNG_STEPS
    assert ladder.rung_min_steps(2_000, top=True) == 1500


# --------------------------------------------------------------------------- reports


def _section() -> dict[str, Any]:
    def rung(width: int, met: bool, agreement: float, latency: float) -> dict[str, Any]:
        return {
            "hidden_sizes": [width, width],
            "parameters": width * width + 40 * width,
            "file_bytes": 4 * (width * width + 40 * width) + 900,
            "onnxruntime_latency_ms": latency,
            "latency_ms": latency,
            "validation": {
                "metric": {"name": "accuracy", "value": agreement, "teacher": 1.0},
                "fidelity": {"name": "agreement", "value": agreement},
            },
            "steps": 500,
            "seconds": 2.5,
            "met_criteria": met,
            "reasons": ["missed: x"] if not met else ["met: x"],
        }

    return {
        "rungs": [rung(8, False, 0.9, 0.01), rung(24, True, 0.97, 0.012)],
        "chosen": 1,
        "basis": "validation",
        "met_criteria": True,
        "teacher": {"metric": {"name": "accuracy", "value": 1.0}, "latency_ms": 0.03},
        "criteria": {"max_latency_ms": 0.02},
    }


def test_the_ladder_section_is_checked_by_the_schema() -> None:
    from tests.worker.engine.test_evaluation import EXTRA, _side

    fidelity = dict.fromkeys(FIDELITY_KEYS, 0.9)
    metrics = build_metrics(
        "classification", _side(0.97, 100_000, 2.0), _side(0.95, 1_000, 0.5), fidelity, None, EXTRA
    )
    assert metrics["ladder"] is None
    validate_metrics({**metrics, "ladder": _section()})
    with pytest.raises(ValueError, match=r"ladder\.chosen"):
        validate_metrics({**metrics, "ladder": {**_section(), "chosen": 2}})
    broken = _section()
    del broken["rungs"][0]["met_criteria"]
    with pytest.raises(ValueError, match=r"ladder\.rungs\[0\]\.met_criteria"):
        validate_metrics({**metrics, "ladder": broken})
    cnn = _section()
    for rung in cnn["rungs"]:
        width = rung.pop("hidden_sizes")[0]
        rung["channels"] = [width, 2 * width]
    validate_metrics({**metrics, "ladder": {**cnn, "knob": "channels"}})
    with pytest.raises(ValueError, match=r"ladder\.rungs\[0\]\.hidden_sizes: required"):
        validate_metrics({**metrics, "ladder": cnn})
    with pytest.raises(ValueError, match=r"ladder\.basis"):
        validate_metrics({**metrics, "ladder": {**_section(), "basis": "test"}})


def test_the_card_shows_the_ladder_after_the_verdict_and_the_png_is_written(
    tmp_path: Path,
) -> None:
    from tests.worker.engine.report.test_model_card import METRICS

    card = write_model_card(
        tmp_path / "model_card.md", {**METRICS, "ladder": _section()}, {}, {}, {}
    ).read_text()
    assert card.index("## Verdict") < card.index("## Student ladder") < card.index("## Results")
    rows = [line for line in card.splitlines() if line.startswith("| **chosen**")]
    assert len(rows) == 1 and "24 × 24" in rows[0]
    # A rung that met every criterion by a margin the rows cannot show reads unsettled.
    section = _section()
    caveat = "the 126 validation rows cannot settle min_agreement: ..."
    unsettled = {**section["rungs"][0], "reasons": ["met: x"], "caveats": [caveat]}
    section["rungs"] = [unsettled, *section["rungs"][1:]]
    card = write_model_card(
        tmp_path / "model_card.md", {**METRICS, "ladder": section}, {}, {}, {}
    ).read_text()
    first = next(line for line in card.splitlines() if line.startswith("|  | 8 × 8"))
    assert first.endswith("| unsettled |"), first
    assert f"- rung 0: {caveat}" in card
    png = plot_student_ladder(tmp_path / "student_ladder.png", _section())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random forest fully trained on its own rows; unlabelled transfer rows; held-out rows."""
    from sklearn.datasets import make_classification

    # Two well-separated classes: a smooth boundary a forest approximates with many trees.
    x, y = make_classification(
        n_samples=3000,
        n_features=8,
        n_informative=3,
        n_redundant=0,
        n_classes=2,
        n_clusters_per_class=1,
        flip_y=0.0,
        class_sep=2.0,
        random_state=0,
    )
    x = x.astype(np.float32)
    teacher_rows, transfer_rows, held_out = slice(0, 1200), slice(1200, 2550), slice(2550, None)
    folder = tmp_path_factory.mktemp("forest")
    path, _ = sklearn_forest_onnx(
        x[teacher_rows], y[teacher_rows], folder / "forest.onnx", n_estimators=500
    )
    return {
        "path": path,
        "transfer": write_npz(folder / "transfer.npz", x[transfer_rows]),
        "x_held_out": x[held_out],
        "y_held_out": y[held_out],
    }


def _run(forest: dict[str, Any], out: Path, spec: dict[str, Any]) -> tuple[Any, list[Any]]:
    events: list[Any] = []
    result = run(
        DistillationSpec.model_validate(spec),
        teacher_path=forest["path"],
        dataset_path=forest["transfer"],
        out_dir=out,
        callbacks=Callbacks(on_event=lambda kind, data: events.append((kind, data))),
    )
    return result, events


def test_the_ladder_keeps_a_small_student_as_accurate_and_faster_than_the_forest(
    tmp_path: Path, forest: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.engine import export

    exported: list[Path] = []
    real_export = export.export_onnx

    def export_onnx(student: Any, example: Any, path: Path) -> Any:
        exported.append(Path(path))
        return real_export(student, example, path)

    # Watched, not replaced: every export still runs.
    monkeypatch.setattr(export, "export_onnx", export_onnx)
    # The product's defaults.
    result, events = _run(forest, tmp_path / "out", {})
    section = result.metrics["ladder"]
    rungs = section["rungs"]
    chosen = section["chosen"]
    assert section["basis"] == "validation"
    # The smallest rung that met the criteria: every smaller one missed them.
    assert section["met_criteria"] and rungs[chosen]["met_criteria"]
    assert not any(rung["met_criteria"] for rung in rungs[:chosen])
    assert len(rungs) == chosen + 1, "the climb stops at the first rung that meets them"
    assert [data["rung"] for kind, data in events if kind == "ladder_rung"] == list(
        range(len(rungs))
    )
    top = section["planned"][-1]
    assert rungs[chosen]["hidden_sizes"] != top, "a smaller student than auto alone designs"
    config = json.loads((tmp_path / "out" / "student_config.json").read_text())
    assert config["hidden_sizes"] == rungs[chosen]["hidden_sizes"]
    assert result.metrics["student"]["parameters"] == rungs[chosen]["parameters"]
    # Each rung is exported once, when it is measured; the job's file is the chosen one's.
    assert [path.parent.name for path in exported] == [f"rung-{i}" for i in range(len(rungs))]
    assert (tmp_path / "out" / "student.onnx").is_file()

    # Scored here, in onnxruntime, on rows nothing chose with.
    teacher = ort.InferenceSession(str(forest["path"]), providers=["CPUExecutionProvider"])
    student_path = tmp_path / "out" / "student.onnx"
    student = ort.InferenceSession(str(student_path), providers=["CPUExecutionProvider"])
    name = teacher.get_inputs()[0].name
    feed = {name: forest["x_held_out"]}
    y = forest["y_held_out"]
    teacher_accuracy = float(np.mean(teacher.run(None, feed)[0] == y))
    student_accuracy = float(np.mean(student.run(None, feed)[0] == y))
    # Timed in turn, run for run, as the engine times them: whatever else the machine runs
    # falls on both alike (timed apart, a busy spell can land on one of them only).
    teacher_latency, student_latency = paired_latency_ms(
        [OnnxFile(forest["path"]), OnnxFile(student_path)], feed
    )
    print(
        f"rungs {[r['hidden_sizes'] for r in rungs]} chosen {chosen}; accuracy teacher "
        f"{teacher_accuracy:.4f} student {student_accuracy:.4f}; latency ms teacher "
        f"{teacher_latency:.4f} student {student_latency:.4f}"
    )
    assert student_accuracy >= teacher_accuracy - 0.01, (student_accuracy, teacher_accuracy)
    assert student_latency < teacher_latency, (student_latency, teacher_latency)

    out = tmp_path / "out"
    card = (out / "model_card.md").read_text()
    assert "## Student ladder" in card and "**chosen**" in card
    names = {artifact.name for artifact in result.artifacts}
    assert "student_ladder.png" in names
    validate_metrics(json.loads((out / "metrics.json").read_text()))


#: The bytes of weights a student may take in the int8 scenario: the smallest rung's fp32
#: weights take 712 (8 × 8 hidden, inputs' scaling), its int8 weights about 300.
INT8_ONLY_BYTES = 500


def _weight_bytes(path: Path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def test_the_cli_deploys_a_rungs_int8_file_where_only_it_is_small_enough(
    tmp_path: Path, forest: dict[str, Any]
) -> None:
    # The product's defaults, int8 asked for, and a compression (by bytes: the forest has no
    # parameters) that no rung's fp32 weights reach and the smallest rung's int8 ones do.
    # Speed is not judged: on a loaded machine a batch-1 timing of a tiny graph is noise,
    # and what chooses int8 here is size.
    teacher_bytes = forest["path"].stat().st_size
    min_compression = teacher_bytes / INT8_ONLY_BYTES
    spec = {
        "teacher": {"path": str(forest["path"])},
        "dataset": {"path": str(forest["transfer"])},
        "export": {"quantize": ["int8"]},
        "evaluation": {"accept": {"min_compression": min_compression, "min_speedup": None}},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    proc = run_engine_cli(tmp_path, "--quiet")
    summary = json.loads(proc.stdout)
    metrics = json.loads((out / "metrics.json").read_text())
    validate_metrics(metrics)

    # The ladder: the smallest rung whose int8 file met the criteria, its fp32 file not.
    section = metrics["ladder"]
    rungs, chosen = section["rungs"], section["chosen"]
    judged = [(rung["reasons"], (rung["int8"] or {}).get("reasons")) for rung in rungs]
    assert section["chosen_precision"] == "int8" and section["met_criteria"] is True, judged
    assert section["stopped"] == "met_criteria" and len(rungs) == chosen + 1
    assert rungs[chosen]["met_criteria"] is False and rungs[chosen]["int8"]["met_criteria"]
    missed = [r for r in rungs[chosen]["reasons"] if r.startswith("missed")]
    assert len(missed) == 1 and "[min_compression]" in missed[0]
    assert not any(ladder.met(rung) for rung in rungs[:chosen])
    assert rungs[chosen]["bytes"] > INT8_ONLY_BYTES >= rungs[chosen]["int8"]["bytes"]

    # The verdict is the int8 file's, on the test rows: its figures, not the fp32 ones.
    int8_path = out / "student.int8.onnx"
    assert metrics["deployed_file"] == summary["deployed_file"] == "student.int8.onnx"
    entry = metrics["quantized"]["int8"]
    verdict = metrics["verdict"]
    assert verdict == summary["verdict"]
    assert verdict == {
        **entry["verdict"],
        "reasons": [verdict["reasons"][0], *entry["verdict"]["reasons"]],
    }
    assert verdict["deployable"] is True and verdict["reasons"][0].startswith(
        "judged on student.int8.onnx"
    )
    assert not any(r.startswith("missed") for r in verdict["reasons"])
    criteria = verdict["criteria"]
    assert entry["bytes"] == _weight_bytes(int8_path) <= INT8_ONLY_BYTES
    assert criteria["min_compression"]["value"] == pytest.approx(teacher_bytes / entry["bytes"])
    assert metrics["compression_basis"] == "bytes" and metrics["compression"] < min_compression
    assert criteria["min_agreement"]["value"] == entry["fidelity"]["agreement"]
    teacher_accuracy = metrics["teacher"]["accuracy"]
    assert criteria["min_metric_ratio"]["value"] == pytest.approx(
        entry["accuracy"] / teacher_accuracy
    )
    assert "min_speedup" not in criteria

    # The card names the int8 file as the one to deploy.
    card = (out / "model_card.md").read_text()
    head = card[: card.index("## Student ladder")]
    assert "## Verdict: deployable" in head
    assert "The file to deploy is `student.int8.onnx`" in head
    assert "**chosen (int8)**" in card
    assert "- `student.int8.onnx`: the same inputs and outputs, int8 weights; **the file to" in card

    # Scored here, in onnxruntime, on rows nothing chose with: the int8 file fed the
    # teacher's feed answers as the teacher does, within the accuracy criteria.
    accept = DistillationSpec().evaluation.accept
    teacher = ort.InferenceSession(str(forest["path"]), providers=["CPUExecutionProvider"])
    student = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    feed = {teacher.get_inputs()[0].name: forest["x_held_out"]}
    teacher_labels, student_labels = teacher.run(None, feed)[0], student.run(None, feed)[0]
    y = forest["y_held_out"]
    agreement = float(np.mean(student_labels == teacher_labels))
    teacher_accuracy = float(np.mean(teacher_labels == y))
    student_accuracy = float(np.mean(student_labels == y))
    print(
        f"int8 rung {rungs[chosen]['hidden_sizes']}: {entry['bytes']} weight bytes; held out "
        f"agreement {agreement:.4f}, accuracy teacher {teacher_accuracy:.4f} int8 "
        f"{student_accuracy:.4f}"
    )
    assert accept.min_agreement is not None and accept.min_metric_ratio is not None
    assert agreement >= accept.min_agreement, agreement
    assert student_accuracy >= accept.min_metric_ratio * teacher_accuracy, (
        student_accuracy,
        teacher_accuracy,
    )


def test_a_latency_bound_no_rung_meets_is_flagged_and_the_verdict_says_so(
    tmp_path: Path, forest: dict[str, Any]
) -> None:
    # max_parameters caps the top rung and max_steps every rung: the failing climb stays short.
    # Each rung's int8 file is judged too, and misses the bound as well.
    spec = {
        "student": {"max_latency_ms": 1e-6, "max_parameters": 1000},
        "training": {"max_steps": 200, "checkpoint_every_minutes": None},
        "export": {"quantize": ["int8"]},
    }
    result, _ = _run(forest, tmp_path / "out", spec)
    section = result.metrics["ladder"]
    rungs = section["rungs"]
    assert section["met_criteria"] is False and section["chosen_precision"] == "fp32"
    assert all(rung["int8"]["met_criteria"] is False for rung in rungs)
    assert all(rung["int8"]["file_bytes"] < rung["file_bytes"] for rung in rungs)
    assert result.metrics["deployed_file"] == "student.onnx"
    assert result.metrics["quantized"]["int8"]["verdict"]["deployable"] is False
    card = (tmp_path / "out" / "model_card.md").read_text()
    assert "Each rung's int8 file was judged too" in card and "**chosen**" in card
    assert not any(rung["met_criteria"] for rung in rungs)
    assert len(rungs) == len(section["planned"]), "no rung met: all were tried"
    assert rungs[-1]["parameters"] <= 1000
    assert all(rung["steps"] <= 200 for rung in rungs)
    best = max(rung["validation"]["fidelity"]["value"] for rung in rungs)
    assert rungs[section["chosen"]]["validation"]["fidelity"]["value"] == best
    assert all(
        any(r.startswith("missed") and "[max_latency_ms]" in r for r in rung["reasons"])
        for rung in rungs
    )
    verdict = result.metrics["verdict"]
    assert verdict["deployable"] is False and result.deployable is False
    assert verdict["criteria"]["max_latency_ms"]["met"] is False
    assert any(r.startswith("missed") and "[max_latency_ms]" in r for r in verdict["reasons"])


def test_a_cancellation_after_a_rung_keeps_the_rungs_trained_so_far(
    tmp_path: Path, forest: dict[str, Any]
) -> None:
    # A climb that would try every rung (no rung meets the bound), cancelled once the first
    # rung is judged: the next rung never starts, and the first is the job's student.
    spec = {
        "student": {"max_latency_ms": 1e-6, "max_parameters": 1000},
        "training": {"max_steps": 200, "checkpoint_every_minutes": None},
        "evaluation": {"baseline": False},
    }
    judged: list[int] = []
    result = run(
        DistillationSpec.model_validate(spec),
        teacher_path=forest["path"],
        dataset_path=forest["transfer"],
        out_dir=tmp_path / "out",
        callbacks=Callbacks(
            on_event=lambda kind, data: (
                judged.append(data["rung"]) if kind == "ladder_rung" else None
            ),
            should_cancel=lambda: bool(judged),
            cancel_keeps_student=lambda: True,
        ),
    )
    section = result.metrics["ladder"]
    assert judged == [0] and len(section["rungs"]) == 1 < len(section["planned"])
    assert section["stopped"] == "cancelled" and section["chosen"] == 0
    assert result.stop_reason == "cancelled" and result.partial and not result.deployable
    assert result.metrics["student"]["parameters"] == section["rungs"][0]["parameters"]
    assert (tmp_path / "out" / "student.onnx").exists()


def test_the_event_log_serves_ladder_rung_events() -> None:
    from datetime import UTC, datetime

    from app.jobs.schemas import JobEventOut

    event = JobEventOut.model_validate(
        {
            "id": 1,
            "type": "ladder_rung",
            "attempt": 1,
            "data": {"rung": 0, "rungs": 5, **_section()["rungs"][0]},
            "created_at": datetime.now(UTC),
        }
    )
    assert event.type == "ladder_rung"
