"""Task metrics against scikit-learn, fidelity, speed and the metrics.json schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from worker.engine.evaluation import (
    FIDELITY_KEYS,
    TASK_METRICS,
    build_metrics,
    classification_metrics,
    embedding_metrics,
    fidelity,
    measure_latency,
    measure_speed,
    measure_throughput,
    module_bytes,
    not_evaluated,
    regression_metrics,
    task_metrics,
    validate_metrics,
)
from worker.engine.spec import AcceptSpec


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------- task metrics


@pytest.mark.parametrize("k", [2, 3, 10])
def test_classification_metrics_match_sklearn(rng: np.random.Generator, k: int) -> None:
    scores = rng.normal(size=(300, k))
    # Labels correlated with scores, and one class never predicted nor labeled.
    labels = np.where(rng.random(300) < 0.6, scores.argmax(1), rng.integers(0, k, 300))
    got = classification_metrics(scores, labels)
    pred = scores.argmax(1)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert got["f1_macro"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    # With K <= 5 every class is in the top K (sklearn only warns that it is meaningless).
    expected_top = skm.top_k_accuracy_score(labels, scores, k=5) if k > 5 else 1.0
    assert got["top5_accuracy"] == pytest.approx(expected_top)


def test_f1_macro_counts_classes_only_predicted(rng: np.random.Generator) -> None:
    labels = np.array([0, 0, 1, 1, 1])
    pred = np.array([0, 2, 1, 1, 3])  # classes 2 and 3 appear only in predictions
    scores = np.eye(4)[pred]
    assert classification_metrics(scores, labels)["f1_macro"] == pytest.approx(
        skm.f1_score(labels, pred, average="macro", zero_division=0)
    )


def test_single_logit_reads_as_binary() -> None:
    logits = np.array([[-2.0], [3.0], [0.5], [-0.1]])
    got = classification_metrics(logits, np.array([0, 1, 1, 1]))
    assert got["accuracy"] == pytest.approx(0.75)


def test_regression_metrics_match_sklearn(rng: np.random.Generator) -> None:
    target = rng.normal(size=(200, 3))
    pred = target + rng.normal(scale=0.3, size=target.shape)
    got = regression_metrics(pred, target)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(target, pred))
    assert got["mse"] == pytest.approx(skm.mean_squared_error(target, pred))
    assert got["r2"] == pytest.approx(skm.r2_score(target, pred))
    one = regression_metrics(pred[:, 0], target[:, 0])
    assert one["r2"] == pytest.approx(skm.r2_score(target[:, 0], pred[:, 0]))


def test_regression_r2_on_constant_target_follows_sklearn() -> None:
    target = np.ones((5, 1))
    assert regression_metrics(target.copy(), target)["r2"] == skm.r2_score(target, target)
    assert regression_metrics(target + 1, target)["r2"] == skm.r2_score(target, target + 1)


def test_embedding_cosine(rng: np.random.Generator) -> None:
    teacher = rng.normal(size=(50, 16))
    assert embedding_metrics(teacher * 3.0, teacher)["cosine"] == pytest.approx(1.0)
    assert embedding_metrics(-teacher, teacher)["cosine"] == pytest.approx(-1.0)
    student = rng.normal(size=(50, 16))
    expected = np.mean(
        [
            a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            for a, b in zip(student, teacher, strict=True)
        ]
    )
    assert embedding_metrics(student, teacher)["cosine"] == pytest.approx(expected)


# --------------------------------------------------------------------------- fidelity


def test_fidelity_same_for_probability_and_logit_teachers(rng: np.random.Generator) -> None:
    teacher_logits = rng.normal(size=(100, 5)) * 2
    student = rng.normal(size=(100, 5))
    from_logits = fidelity(student, teacher_logits, "classification", "logits")
    from_probs = fidelity(student, _softmax(teacher_logits), "classification", "probabilities")
    assert set(from_logits) == set(FIDELITY_KEYS)
    for key in ("agreement", "kl_divergence", "output_mse"):
        assert from_probs[key] == pytest.approx(from_logits[key], rel=1e-6, abs=1e-9)
    assert from_logits["r2_to_teacher"] is None and from_logits["cosine"] is None


def test_kl_matches_torch_and_is_zero_for_identical(rng: np.random.Generator) -> None:
    teacher = rng.normal(size=(64, 7))
    student = rng.normal(size=(64, 7))
    same = fidelity(teacher, teacher, "classification", "logits")
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    assert same["agreement"] == 1.0 and same["output_mse"] == pytest.approx(0.0, abs=1e-15)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(torch.from_numpy(student), 1),
        torch.log_softmax(torch.from_numpy(teacher), 1),
        log_target=True,
        reduction="batchmean",
    ).item()
    got = fidelity(student, teacher, "classification", "logits")["kl_divergence"]
    assert got == pytest.approx(expected, rel=1e-9)


def test_kl_stays_finite_with_hard_zero_probabilities() -> None:
    # A tree ensemble can output exact 0/1 probabilities.
    teacher = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    student = np.array([[5.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    result = fidelity(student, teacher, "classification", "probabilities")
    assert result["kl_divergence"] is not None and result["kl_divergence"] >= 0


def test_fidelity_regression_and_embedding(rng: np.random.Generator) -> None:
    teacher = rng.normal(size=(80, 2))
    student = teacher + 0.1 * rng.normal(size=teacher.shape)
    reg = fidelity(student, teacher, "regression", "values")
    assert reg["agreement"] is None and reg["kl_divergence"] is None
    assert reg["output_mse"] == pytest.approx(skm.mean_squared_error(teacher, student))
    assert reg["r2_to_teacher"] == pytest.approx(skm.r2_score(teacher, student))
    emb = fidelity(student, teacher, "embedding", "embedding")
    assert emb["cosine"] == pytest.approx(embedding_metrics(student, teacher)["cosine"])
    assert emb["agreement"] is None and emb["r2_to_teacher"] is None


# --------------------------------------------------------------------------- speed


def test_latency_and_throughput_for_modules_and_callables() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    one = {"inputs": torch.randn(1, 16)}
    many = {"inputs": torch.randn(256, 16)}

    def module_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["inputs"])

    def numpy_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Like an onnxruntime-backed teacher: numpy in, tensor out.
        return torch.from_numpy(np.tanh(batch["inputs"].numpy()))

    for fn in (module_fn, numpy_fn):
        ms = measure_latency(fn, one, "cpu", warmup=2, repeats=5, budget_s=0.2)
        assert 0 < ms < 200
        rate = measure_throughput(fn, many, torch.device("cpu"), min_seconds=0.05)
        assert rate > 256


def test_latency_respects_its_budget() -> None:
    import time

    calls = []

    def slow(batch: object) -> None:
        calls.append(1)
        time.sleep(0.02)

    measure_latency(slow, {"inputs": torch.zeros(1)}, "cpu", warmup=50, repeats=50, budget_s=0.1)
    assert len(calls) < 15


# --------------------------------------------------------------------------- metrics.json


def _side(accuracy: float, params: int, latency: float) -> dict[str, object]:
    return {
        "accuracy": accuracy,
        "top5_accuracy": 0.99,
        "f1_macro": accuracy - 0.01,
        "parameters": params,
        "bytes": params * 4,
        "latency_ms": latency,
        "throughput": 1000.0 / latency,
    }


_INTERVAL = {"metric": "accuracy", "estimate": 0.9, "low": 0.85, "high": 0.94}
SPLIT = {
    "train_rows": 1200,
    "validation_rows": 180,
    "test_rows": 270,
    "test_source": "split",
    "reference": "labels",
}
EXTRA = {
    "split": SPLIT,
    "intervals": {
        "confidence": 0.95,
        "resamples": 1000,
        "teacher": _INTERVAL,
        "student": _INTERVAL,
        "fidelity": {**_INTERVAL, "metric": "agreement"},
    },
    "runtime": {"teacher": "onnxruntime", "student": "onnxruntime", "speed": "onnxruntime"},
    "device": "cpu",
    "partial": False,
    "training": {"steps": 100, "stop_reason": "completed"},
}


def test_build_metrics_has_every_design_key_and_validates() -> None:
    fid = fidelity(np.eye(3), np.eye(3) * 2, "classification", "logits")
    metrics = build_metrics(
        task="classification",
        teacher=_side(0.97, 100_000, 2.0),
        student=_side(0.95, 10_000, 0.5),
        fidelity=fid,
        baseline=None,
        extra=EXTRA,
    )
    validate_metrics(metrics)
    validate_metrics(json.loads(json.dumps(metrics)))
    for key in ("task", "teacher", "student", "fidelity", "compression", "speedup"):
        assert key in metrics
    for side in ("teacher", "student"):
        for key in (
            "accuracy",
            "top5_accuracy",
            "f1_macro",
            "parameters",
            "bytes",
            "latency_ms",
            "throughput",
        ):
            assert key in metrics[side]
    for key in ("agreement", "kl_divergence", "output_mse"):
        assert key in metrics["fidelity"]
    assert metrics["compression"] == pytest.approx(10.0)
    assert metrics["compression_basis"] == "parameters"
    assert metrics["speedup"] == pytest.approx(4.0)
    assert metrics["baseline"] is None and metrics["baseline_comparison"] is None
    assert isinstance(metrics["verdict"]["deployable"], bool)
    assert metrics["split"] == SPLIT
    assert metrics["training"]["steps"] == 100 and metrics["partial"] is False


def test_compression_by_bytes_when_teacher_has_no_parameters() -> None:
    teacher = {"mae": 0.1, "mse": 0.02, "r2": 0.9, "parameters": 0, "bytes": 8_000_000}
    teacher |= {"latency_ms": 1.0, "throughput": 1e4}
    student = {"mae": 0.12, "mse": 0.03, "r2": 0.85, "parameters": 1000, "bytes": 4000}
    student |= {"latency_ms": 0.1, "throughput": 1e5}
    fid = fidelity(np.zeros((4, 1)), np.zeros((4, 1)), "regression", "values")
    metrics = build_metrics("regression", teacher, student, fid, None, EXTRA)
    assert metrics["compression"] == pytest.approx(2000.0)
    assert metrics["compression_basis"] == "bytes"


def test_baseline_verdict_both_ways() -> None:
    fid = dict.fromkeys(FIDELITY_KEYS, 0.5)
    teacher = _side(0.97, 100_000, 2.0)

    better = build_metrics(
        "classification", teacher, _side(0.95, 10_000, 0.5), fid, _side(0.90, 10_000, 0.5), EXTRA
    )
    assert better["distillation_helped"] is True
    assert better["baseline_comparison"].startswith("distillation helped")
    assert "0.95" in better["baseline_comparison"] and "0.9" in better["baseline_comparison"]
    assert better["baseline"]["accuracy"] == 0.90

    worse = build_metrics(
        "classification", teacher, _side(0.90, 10_000, 0.5), fid, _side(0.91, 10_000, 0.5), EXTRA
    )
    assert worse["distillation_helped"] is False
    assert worse["baseline_comparison"] == (
        "distillation did not help: the labels-only student scored 0.91 accuracy "
        "vs 0.9 for the distilled student"
    )
    # Within the tolerance counts as "did not help".
    tie = build_metrics(
        "classification", teacher, _side(0.902, 10_000, 0.5), fid, _side(0.90, 10_000, 0.5), EXTRA
    )
    assert tie["distillation_helped"] is False
    validate_metrics(worse)


def test_regression_verdict_uses_mse_lower_is_better() -> None:
    def side(mse: float) -> dict[str, object]:
        speed = {"latency_ms": 1.0, "throughput": 100.0}
        return {"mae": mse, "mse": mse, "r2": 1 - mse, "parameters": 10, "bytes": 40, **speed}

    fid = dict.fromkeys(FIDELITY_KEYS)
    helped = build_metrics("regression", side(0.1), side(0.05), fid, side(0.2), EXTRA)
    assert helped["distillation_helped"] is True and "0.05 mse" in helped["baseline_comparison"]
    hurt = build_metrics("regression", side(0.1), side(0.2), fid, side(0.05), EXTRA)
    assert hurt["distillation_helped"] is False


def test_validate_metrics_rejects_bad_objects() -> None:
    good = build_metrics(
        "classification",
        _side(0.97, 100, 2.0),
        _side(0.95, 10, 0.5),
        dict.fromkeys(FIDELITY_KEYS),
        None,
        EXTRA,
    )
    validate_metrics(good)
    bad_cases = []
    no_accuracy = json.loads(json.dumps(good))
    del no_accuracy["student"]["accuracy"]
    bad_cases.append((no_accuracy, "metrics.student.accuracy: required"))
    bad_task = {**good, "task": "ranking"}
    bad_cases.append((bad_task, "metrics.task"))
    bad_reference = {**good, "split": {**SPLIT, "reference": "guess"}}
    bad_cases.append((bad_reference, "metrics.split.reference"))
    no_fidelity_key = {**good, "fidelity": {"agreement": 1.0}}
    bad_cases.append((no_fidelity_key, "metrics.fidelity.kl_divergence: required"))
    string_params = json.loads(json.dumps(good))
    string_params["teacher"]["parameters"] = "100"
    bad_cases.append((string_params, "metrics.teacher.parameters"))
    no_device = {k: v for k, v in good.items() if k != "device"}
    bad_cases.append((no_device, "metrics.device: required"))
    no_test_rows = {**good, "split": {k: v for k, v in SPLIT.items() if k != "test_rows"}}
    bad_cases.append((no_test_rows, "metrics.split.test_rows: required"))
    string_verdict = {**good, "verdict": "deployable"}
    bad_cases.append((string_verdict, "metrics.verdict: expected object"))
    no_intervals = {k: v for k, v in good.items() if k != "intervals"}
    bad_cases.append((no_intervals, "metrics.intervals: required"))
    for obj, message in bad_cases:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            validate_metrics(obj)


def test_an_unevaluated_student_needs_no_test_figures_but_cannot_be_deployable() -> None:
    verdict = not_evaluated("classification", AcceptSpec().model_dump(), "cancelled")
    assert verdict["deployable"] is False and verdict["reasons"] == [
        "not deployable: cancelled; no criterion was checked"
    ]
    assert {c["met"] for c in verdict["criteria"].values()} == {None}
    split = {k: v for k, v in SPLIT.items() if k in ("train_rows", "validation_rows", "test_rows")}
    unevaluated = {
        "task": "classification",
        "evaluated": False,
        "partial": True,
        "cancelled_during": "evaluation",
        "split": {**split, "test_source": "split"},
        "training": {"steps": 8, "stop_reason": "cancelled"},
        "verdict": verdict,
    }
    validate_metrics(unevaluated)
    bad_cases = [
        ({**unevaluated, "verdict": {**verdict, "deployable": True}}, "verdict.deployable"),
        ({**unevaluated, "partial": False}, "metrics.partial"),
        ({**unevaluated, "cancelled_during": "training"}, "metrics.cancelled_during"),
        ({k: v for k, v in unevaluated.items() if k != "training"}, "training: required"),
        # Without ``evaluated`` false, every figure is required as before.
        ({**unevaluated, "evaluated": True}, "metrics.teacher: required"),
    ]
    for obj, message in bad_cases:
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            validate_metrics(obj)


def test_build_metrics_refuses_missing_split_and_makes_numpy_plain() -> None:
    side = {k: np.float32(v) if isinstance(v, float) else v for k, v in _side(0.9, 10, 1.0).items()}
    side["parameters"] = np.int64(10)
    fid = {k: np.float64(0.5) for k in FIDELITY_KEYS}
    metrics = build_metrics("classification", side, side, fid, None, EXTRA)
    json.dumps(metrics)  # numpy scalars would not serialise
    assert type(metrics["student"]["parameters"]) is int
    with pytest.raises(ValueError, match="split"):
        no_split = {k: v for k, v in EXTRA.items() if k != "split"}
        build_metrics("classification", side, side, fid, None, no_split)
    with pytest.raises(ValueError, match="computed keys"):
        build_metrics("classification", side, side, fid, None, {**EXTRA, "speedup": 2.0})


def test_task_metrics_pick_the_task_s_metrics(rng: np.random.Generator) -> None:
    scores = rng.normal(size=(20, 3))
    labels = scores.argmax(1)
    assert task_metrics("classification", scores, labels)["accuracy"] == 1.0
    values = rng.normal(size=(20, 2)).astype(np.float32)
    assert task_metrics("regression", values, values)["mse"] == 0.0
    assert task_metrics("embedding", values, values)["cosine"] == pytest.approx(1.0)


def test_measure_speed_and_module_bytes() -> None:
    module = torch.nn.Linear(4, 2)
    inputs = {"inputs": torch.randn(300, 4)}
    speed = measure_speed(lambda batch: module(batch["inputs"]), inputs, torch.device("cpu"))
    assert set(speed) == {"latency_ms", "throughput"}
    assert speed["latency_ms"] > 0 and speed["throughput"] > 0
    assert module_bytes(module) == (4 * 2 + 2) * 4


def test_quantized_students_get_their_comparisons_and_are_validated() -> None:
    fid = dict.fromkeys(FIDELITY_KEYS, 0.5)
    teacher = {**_side(0.97, 100_000, 2.0), "file_bytes": 400_000}
    student = {**_side(0.95, 10_000, 0.5), "file_bytes": 40_000, "onnxruntime_latency_ms": 0.02}
    scores = _side(0.94, 10_000, 0.5)
    int8 = {
        **{k: scores[k] for k in TASK_METRICS["classification"]},
        "file_bytes": 12_500,
        "method": "dynamic",
        "fidelity": {"agreement": 0.98},
        "onnxruntime_latency_ms": 0.01,
        "onnxruntime_throughput": 5e5,
    }
    metrics = build_metrics(
        "classification", teacher, student, fid, None, EXTRA, quantized={"int8": int8}
    )
    entry = metrics["quantized"]["int8"]
    assert entry["compression_by_file_bytes"] == pytest.approx(32.0)
    assert entry["file_bytes_vs_fp32"] == pytest.approx(3.2)
    assert entry["metric_delta_vs_fp32"] == pytest.approx(-0.01)
    assert entry["speedup_vs_fp32"] == pytest.approx(2.0)
    assert entry["primary_metric"] == "accuracy"
    assert set(FIDELITY_KEYS) <= set(entry["fidelity"]) and entry["fidelity"]["agreement"] == 0.98
    validate_metrics(json.loads(json.dumps(metrics)))
    # The int8 file has its own verdict, read as the student: here its latency (0.01 ms,
    # under a 0.015 ms bound the fp32 file's 0.5 ms misses) against the teacher's
    # onnxruntime latency, which this teacher lacks, so the speedup cannot be checked.
    bound = build_metrics(
        "classification",
        teacher,
        student,
        fid,
        None,
        EXTRA,
        accept={"max_latency_ms": 0.015, "min_agreement": 0.95},
        quantized={"int8": int8},
    )
    assert bound["verdict"]["criteria"]["max_latency_ms"]["met"] is False
    int8_verdict = bound["quantized"]["int8"]["verdict"]
    assert int8_verdict["criteria"]["max_latency_ms"] == {
        "value": 0.01,
        "threshold": 0.015,
        "met": True,
    }
    assert int8_verdict["criteria"]["min_agreement"]["value"] == 0.98
    assert int8_verdict["criteria"]["min_speedup"]["met"] is None
    # Not asked for: null; asked for and failed: a null entry.
    assert build_metrics("classification", teacher, student, fid, None, EXTRA)["quantized"] is None
    failed = build_metrics(
        "classification", teacher, student, fid, None, EXTRA, quantized={"int8": None}
    )
    assert failed["quantized"] == {"int8": None}
    validate_metrics(failed)
    # An int8 entry must carry the task's metrics and the figures the schema names.
    for missing in ("accuracy", "file_bytes", "fidelity", "onnxruntime_latency_ms"):
        broken = json.loads(json.dumps(metrics))
        del broken["quantized"]["int8"][missing]
        with pytest.raises(ValueError, match=f"quantized.int8.{missing}: required"):
            validate_metrics(broken)
    with pytest.raises(ValueError, match="not allowed"):
        validate_metrics({**metrics, "quantized": {"int4": None}})
    with pytest.raises(ValueError, match="computed keys"):
        build_metrics("classification", teacher, student, fid, None, {**EXTRA, "quantized": {}})


def test_an_int8_file_counts_its_own_weight_bytes_where_compression_is_by_bytes() -> None:
    # A tree-ensemble teacher has no parameters: compression is by bytes, and the int8
    # file's are its int8 weights, not the fp32 state dict it was quantized from.
    fid = dict.fromkeys(FIDELITY_KEYS, 0.99)
    teacher = {**_side(0.97, 0, 2.0), "bytes": 400_000, "onnxruntime_latency_ms": 2.0}
    student = {**_side(0.97, 1_000, 0.5), "onnxruntime_latency_ms": 0.5}
    scores = _side(0.97, 1_000, 0.5)
    int8 = {
        **{k: scores[k] for k in TASK_METRICS["classification"]},
        "file_bytes": 3_000,
        "bytes": 1_250,
        "fidelity": {"agreement": 0.99},
        "onnxruntime_latency_ms": 0.5,
        "onnxruntime_throughput": 2e3,
    }
    accept = {"min_compression": 200.0}
    metrics = build_metrics(
        "classification", teacher, student, fid, None, EXTRA, accept, quantized={"int8": int8}
    )
    assert metrics["compression_basis"] == "bytes" and metrics["compression"] == 100.0
    assert metrics["verdict"]["criteria"]["min_compression"]["met"] is False
    entry = metrics["quantized"]["int8"]
    assert entry["compression"] == 320.0
    assert entry["verdict"]["criteria"]["min_compression"] == {
        "value": 320.0,
        "threshold": 200.0,
        "met": True,
    }
    assert entry["verdict"]["deployable"] is True
    validate_metrics(json.loads(json.dumps(metrics)))
    # By parameters, the int8 file has the fp32 student's: the same compression.
    by_parameters = build_metrics(
        "classification",
        {**teacher, "parameters": 100_000},
        student,
        fid,
        None,
        EXTRA,
        accept,
        quantized={"int8": int8},
    )
    assert by_parameters["compression_basis"] == "parameters"
    assert by_parameters["quantized"]["int8"]["compression"] == by_parameters["compression"]
