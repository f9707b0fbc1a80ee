"""The model card: every number of metrics.json in its place, optional sections left out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.engine.report import write_model_card

METRICS = {
    "task": "classification",
    "teacher": {
        "accuracy": 0.9733,
        "top5_accuracy": 1.0,
        "f1_macro": 0.9712,
        "parameters": 85_002,
        "bytes": 340_008,
        "latency_ms": 0.412,
        "throughput": 91_234.5,
    },
    "student": {
        "accuracy": 0.9611,
        "top5_accuracy": 0.9944,
        "f1_macro": 0.9598,
        "parameters": 8_410,
        "bytes": 33_640,
        "latency_ms": 0.0871,
        "throughput": 412_345.0,
    },
    "baseline": {
        "accuracy": 0.9333,
        "top5_accuracy": 0.99,
        "f1_macro": 0.93,
        "parameters": 8_410,
        "bytes": 33_640,
        "latency_ms": 0.0871,
        "throughput": 412_345.0,
    },
    "fidelity": {
        "agreement": 0.9722,
        "kl_divergence": 0.0567,
        "output_mse": 0.0021,
        "r2_to_teacher": None,
        "cosine": None,
    },
    "compression": 10.107,
    "compression_basis": "parameters",
    "speedup": 4.73,
    "distillation_helped": True,
    "baseline_comparison": "distillation helped: the distilled student scored 0.9611 accuracy "
    "vs 0.9333 for the labels-only student",
    "verdict": {
        "deployable": False,
        "reasons": [
            "missed: the student's agreement with the teacher is 0.9722 (at least 0.99 "
            "required) [min_agreement]",
            "met: the speedup over the teacher at batch 1 is 4.73 (at least 1 required) "
            "[min_speedup]",
        ],
        "criteria": {},
        "caveats": ["the 270 test rows cannot settle min_agreement: (figures)"],
    },
    "split": {
        "train_rows": 1200,
        "validation_rows": 180,
        "test_rows": 270,
        "scored_rows": 270,
        "test_source": "split",
        "reference": "labels",
    },
    "intervals": {
        "confidence": 0.95,
        "resamples": 1000,
        "student": {"metric": "accuracy", "estimate": 0.9611, "low": 0.9381, "high": 0.9807},
    },
    "provenance": {"job_id": "job_42", "teacher_sha256": "ab" * 32, "spec": {"task": None}},
    "device": "cpu",
    "partial": False,
    "training": {"steps": 420, "stop_reason": "completed", "method": "kd", "best_step": 380},
}


def test_model_card_holds_the_numbers(tmp_path: Path) -> None:
    spec = {
        "task": None,
        "method": {"name": None, "temperature": 4.0, "alpha": 0.9},
        "training": {"epochs": 20, "batch_size": 128, "learning_rate": 0.001, "optimizer": "adamw"},
    }
    signature = {
        "format": "onnx",
        "inputs": [{"name": "input", "shape": ["batch", 64], "dtype": "float32"}],
        "parameters": 85_002,
        "bytes": 340_008,
        "output_kind": "logits",
        "num_classes": 10,
        "output_dim": 10,
    }
    config = {"architecture": "mlp", "input_names": ["inputs"], "hidden_sizes": [64]}
    path = write_model_card(tmp_path / "model_card.md", METRICS, spec, signature, config)
    text = path.read_text()
    for expected in (
        "(`mlp`)",
        "`onnx` format",
        "| output width | 10 (logits) | 10 |",
        "412,345",
        "`student.onnx`: inputs `inputs`",
        "85,002",
        "8,410",
        "0.9733",
        "0.9611",
        "0.9333",
        "0.9722",
        "0.0567",
        "10.11×",
        "4.73×",
        "temperature: 4",
        "alpha (weight of the teacher's soft targets): 0.9",
        "epochs: 20",
        "method: kd",
        "distillation helped",
        "270 test rows",
        "180 validated",
        "[0.9381, 0.9807]",
        "job_42",
        "step 380",
        "transfer set only",
        "labels-only baseline",
    ):
        assert expected in text, expected
    # The card opens with the verdict, missed criteria first.
    sections = text.split("\n## ")
    assert sections[1].startswith("Verdict: **not deployable**")
    assert "[min_agreement]" in sections[1].splitlines()[2]
    assert "Not settled by the test rows:\n\n- the 270 test rows cannot settle" in sections[1]
    assert "Not a stand-in for the teacher" in text


def test_model_card_without_baseline_or_onnx(tmp_path: Path) -> None:
    side = {"mae": 0.31, "mse": 0.17, "r2": 0.88, "parameters": 0, "bytes": 2_000_000}
    metrics = {
        "task": "regression",
        "teacher": {**side, "latency_ms": 3.1, "throughput": 5000.0},
        "student": {**side, "parameters": 1200, "bytes": 4800, "latency_ms": 0.1},
        "baseline": None,
        "fidelity": {"agreement": None, "output_mse": 0.0123, "r2_to_teacher": 0.97},
        "compression": 416.7,
        "compression_basis": "bytes",
        "speedup": 31.0,
        "verdict": None,
        "split": {"validation_rows": 50, "reference": "teacher"},
        "device": "cuda",
        "partial": True,
    }
    spec = {"export": {"formats": ["safetensors"]}, "method": {"name": "mse"}, "training": {}}
    signature = {"format": "onnx", "inputs": [], "output_kind": "values", "output_dim": 1}
    text = write_model_card(
        tmp_path / "card.md", metrics, spec, signature, {"architecture": "mlp"}
    ).read_text()
    assert "416.7× (by bytes)" in text and "0.0123" in text and "0.97" in text
    assert "the teacher's outputs" in text and "**partial**" in text
    assert "Did distillation help" not in text and "temperature" not in text
    assert "student.onnx" not in text and "labels-only" not in text


def test_model_card_repeats_the_plans_warnings(tmp_path: Path) -> None:
    warning = {
        "code": "small_transfer_set",
        "field": "dataset_id",
        "message": "1200 training sentences are few for a text student",
    }
    training = {"steps": 64, "stop_reason": "max_steps", "plan": {"warnings": [warning]}}
    text = write_model_card(
        tmp_path / "card.md", {**METRICS, "training": training}, {}, {}, {}
    ).read_text()
    how = text.split("## How", 1)[1].split("\n## ", 1)[0]
    assert (
        "- warned before training (small_transfer_set, dataset_id): 1200 training sentences "
        "are few for a text student" in how
    )
    assert (
        "warned before training"
        not in write_model_card(tmp_path / "plain.md", METRICS, {}, {}, {}).read_text()
    )


def test_model_card_sets_the_int8_student_beside_the_fp32_one(tmp_path: Path) -> None:
    int8 = {
        "accuracy": 0.9583,
        "file_bytes": 13_252,
        "method": "dynamic",
        "fidelity": {"agreement": 0.9694, "cosine": None},
        "onnxruntime_latency_ms": 0.0121,
        "compression_by_file_bytes": 26.18,
        "file_bytes_vs_fp32": 3.404,
        "primary_metric": "accuracy",
        "metric_delta_vs_fp32": -0.0028,
        "speedup_vs_fp32": 0.81,
    }
    fp32 = METRICS["student"]
    assert isinstance(fp32, dict)
    student = {**fp32, "file_bytes": 45_115, "onnxruntime_latency_ms": 0.0098}
    metrics: dict[str, Any] = {**METRICS, "student": student, "quantized": {"int8": int8}}
    spec = {"export": {"formats": ["onnx"], "quantize": ["int8"]}}
    text = write_model_card(
        tmp_path / "card.md", metrics, spec, {"format": "onnx"}, {"architecture": "mlp"}
    ).read_text()
    assert "### int8 student" in text
    line = next(row for row in text.splitlines() if row.startswith("`student.int8.onnx`"))
    for figure in ("13,252 bytes", "45,115", "3.404×", "26.18×", "0.9583 vs 0.9611", "-0.0028"):
        assert figure in line
    assert "0.9694" in line and "0.0121 ms vs 0.0098 ms" in line and "dynamic" in line
    assert "- `student.int8.onnx`" in text and "the file to deploy" not in text
    # Where the ladder chose the int8 file, the card names it the one to deploy.
    chosen = {
        **metrics,
        "deployed_file": "student.int8.onnx",
        "quantized": {"int8": {**int8, "bytes": 3_300, "compression": 31.4}},
    }
    text = write_model_card(
        tmp_path / "card.md", chosen, spec, {"format": "onnx"}, {"architecture": "mlp"}
    ).read_text()
    verdict = text[text.index("## Verdict") : text.index("## Results")]
    assert "The file to deploy is `student.int8.onnx`" in verdict
    assert "- `student.int8.onnx`: the same inputs and outputs, int8 weights; **the file" in text
    assert "Its weights take 3,300 bytes: compression 31.4×" in text
    # Asked for but not written: the card says so; not asked for: not a word.
    failed = {**metrics, "quantized": {"int8": None}}
    text = write_model_card(tmp_path / "card.md", failed, spec, {}, {}).read_text()
    assert "int8 quantization was asked for but failed" in text
    text = write_model_card(tmp_path / "card.md", METRICS, {}, {}, {}).read_text()
    assert "int8" not in text
