"""Students of trained scikit-learn teachers with ``method.mixup`` "auto" (4 mixed rows a
training row) against the same jobs without it (``mixup: 0``), in one process.

Each teacher is trained on 70% of a dataset that scikit-learn ships; its transfer set is
those same rows, unlabelled (the engine splits them into train, validation and test). The
other 30% are rows that nothing chose: the bench scores each job's ``student.onnx`` on
them in onnxruntime, against the teacher's ONNX file, and prints per teacher the mean over
``--splits`` random splits of

- classifiers: agreement with the teacher's labels, and accuracy;
- the regressor: R² of the student's outputs to the teacher's, and R² to the truth;

with the difference mixup made, the wall time of both jobs and their ratio, the students'
parameters (the mean; the ladder picks the size), and one JSON line at the end. Everything
else is the product's defaults.

    python bench/mixup_students.py
    python bench/mixup_students.py --splits 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.worker.engine.factories import sklearn_forest_onnx, sklearn_regressor_onnx, write_npz
from worker.engine.pipeline import run
from worker.engine.spec import DistillationSpec

VARIANTS = {"mixup auto": {}, "mixup 0": {"method": {"mixup": 0}}}


def _dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loader = {
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "digits": datasets.load_digits,
        "diabetes": datasets.load_diabetes,
    }[name]
    x, y = loader(return_X_y=True)
    return x.astype(np.float32), y


def _r2(truth: np.ndarray, predicted: np.ndarray) -> float:
    truth, predicted = truth.reshape(-1), predicted.reshape(-1)
    return float(1 - ((truth - predicted) ** 2).sum() / ((truth - truth.mean()) ** 2).sum())


def _one_split(name: str, seed: int, folder: Path) -> dict[str, dict[str, float]]:
    import onnxruntime as ort
    from sklearn.model_selection import train_test_split

    x, y = _dataset(name)
    regression = name == "diabetes"
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=None if regression else y
    )
    if regression:
        teacher_path, _ = sklearn_regressor_onnx(x_train, y_train, folder / "teacher.onnx")
    else:
        teacher_path, _ = sklearn_forest_onnx(x_train, y_train, folder / "teacher.onnx")
    data = write_npz(folder / "transfer.npz", x_train)
    teacher = ort.InferenceSession(str(teacher_path), providers=["CPUExecutionProvider"])
    feed = {teacher.get_inputs()[0].name: x_test}
    teacher_out = teacher.run(None, feed)[0]
    figures: dict[str, dict[str, float]] = {}
    for variant, patch in VARIANTS.items():
        spec = DistillationSpec.model_validate(
            {"training": {"checkpoint_every_minutes": None, "seed": seed}, **patch}
        )
        out = folder / variant.replace(" ", "_")
        started = time.perf_counter()
        result = run(spec, teacher_path=teacher_path, dataset_path=data, out_dir=out)
        seconds = time.perf_counter() - started
        student = ort.InferenceSession(
            str(out / "student.onnx"), providers=["CPUExecutionProvider"]
        )
        student_out = student.run(None, feed)[0]
        if regression:
            fidelity = _r2(teacher_out, student_out)
            task = _r2(y_test, student_out)
        else:
            fidelity = float(np.mean(student_out == teacher_out))
            task = float(np.mean(student_out == y_test))
        figures[variant] = {
            "fidelity": fidelity,
            "task": task,
            "seconds": seconds,
            "parameters": float(result.metrics["student"]["parameters"]),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument(
        "--datasets", nargs="+", default=["breast_cancer", "wine", "digits", "diabetes"]
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for name in args.datasets:
        runs = []
        for seed in range(args.splits):
            with tempfile.TemporaryDirectory() as folder:
                runs.append(_one_split(name, seed, Path(folder)))
        mean = {
            variant: {
                key: float(np.mean([r[variant][key] for r in runs])) for key in runs[0][variant]
            }
            for variant in VARIANTS
        }
        results[name] = mean
        with_, without = mean["mixup auto"], mean["mixup 0"]
        fidelity = "R² to the teacher" if name == "diabetes" else "agreement"
        task = "R²" if name == "diabetes" else "accuracy"
        print(
            f"{name}: {fidelity} {with_['fidelity']:.4f} with mixup, {without['fidelity']:.4f} "
            f"without ({with_['fidelity'] - without['fidelity']:+.4f}); {task} "
            f"{with_['task']:.4f} / {without['task']:.4f}; wall {with_['seconds']:.1f} s / "
            f"{without['seconds']:.1f} s ({with_['seconds'] / without['seconds']:.2f}x); "
            f"student parameters {with_['parameters']:.0f} / {without['parameters']:.0f}"
        )
    print(json.dumps({"splits": args.splits, **results}))


if __name__ == "__main__":
    main()
