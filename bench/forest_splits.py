"""The forest drop-in on several splits: the engine's student against a plain KD loop.

A RandomForestClassifier is trained on 70% of scikit-learn's breast-cancer rows and
converted with skl2onnx; its transfer set is those same training rows, unlabelled.
For each split (``random_state`` 0, 1, ...), ``worker.engine.pipeline.run`` distils
it with the product's defaults, and the exported ``student.onnx`` is scored in
onnxruntime on the held-out 30%, which nothing chose with. Beside it, in the same
process, the plain KD loop of ``tests/worker/engine/test_dropin.py`` (the student's
hidden sizes, cross-entropy to the teacher's probabilities, 60 epochs, the last step
kept) trains twice: on every transfer row, and on as many random rows as the engine
trained on (it holds out validation and test rows), so the gap it leaves is split
into rows and recipe.

It prints a line per split and one JSON line: mean held-out accuracy of teacher,
student and both plain loops, the student's ratio to each, the engine's batch-1
speedup and how many splits the verdict called deployable.

    python bench/forest_splits.py
    python bench/forest_splits.py --splits 2 --trees 500
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.worker.engine.factories import sklearn_forest_onnx, write_npz
from tests.worker.engine.test_dropin import _plain_mlp_on_probabilities
from worker.engine.pipeline import run
from worker.engine.spec import DistillationSpec

PLAIN_EPOCHS = 60
PLAIN_BATCH = 64


def _accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(predicted == truth))


def one_split(split: int, trees: int, folder: Path) -> dict[str, Any]:
    """Teacher, engine student and plain loops on one split, scored on its held-out rows."""
    import onnxruntime as ort
    import torch
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=split)
    teacher_path, forest = sklearn_forest_onnx(
        x_train, y_train, folder / "forest.onnx", n_estimators=trees
    )
    spec = DistillationSpec.model_validate({"training": {"checkpoint_every_minutes": None}})
    result = run(
        spec,
        teacher_path=teacher_path,
        dataset_path=write_npz(folder / "transfer.npz", x_train),
        out_dir=folder / "out",
    )
    teacher = ort.InferenceSession(str(teacher_path), providers=["CPUExecutionProvider"])
    student = ort.InferenceSession(
        str(folder / "out" / "student.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = {teacher.get_inputs()[0].name: x_test}
    hidden = json.loads((folder / "out" / "student_config.json").read_text())["hidden_sizes"]
    probabilities = forest.predict_proba(x_train)

    def plain(rows: np.ndarray) -> float:
        model = _plain_mlp_on_probabilities(
            x_train[rows], probabilities[rows], hidden, PLAIN_EPOCHS, PLAIN_BATCH
        )
        with torch.no_grad():
            classes = model(torch.from_numpy(x_test)).argmax(1).numpy()
        return _accuracy(forest.classes_[classes], y_test)

    train_rows = int(result.metrics["split"]["train_rows"])
    same_rows = np.random.default_rng(split).permutation(len(x_train))[:train_rows]
    return {
        "split": split,
        "teacher": _accuracy(teacher.run(None, feed)[0], y_test),
        "student": _accuracy(student.run(None, feed)[0], y_test),
        "plain_all_rows": plain(np.arange(len(x_train))),
        "plain_engine_rows": plain(same_rows),
        "engine_train_rows": train_rows,
        "transfer_rows": len(x_train),
        "held_out_rows": len(x_test),
        "speedup": result.metrics.get("speedup"),
        "deployable": result.metrics["verdict"]["deployable"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--trees", type=int, default=100)
    args = parser.parse_args()
    rows = []
    for split in range(args.splits):
        with tempfile.TemporaryDirectory(prefix="forest-splits-") as folder:
            row = one_split(split, args.trees, Path(folder))
        rows.append(row)
        print(
            f"split {split}: teacher {row['teacher']:.3f} student {row['student']:.3f} "
            f"plain {row['plain_all_rows']:.3f} (all {row['transfer_rows']} rows) "
            f"{row['plain_engine_rows']:.3f} ({row['engine_train_rows']} rows) "
            f"speedup {row['speedup']:.2f} deployable {row['deployable']}",
            file=sys.stderr,
        )
    mean = {
        key: round(float(np.mean([row[key] for row in rows])), 4)
        for key in ("teacher", "student", "plain_all_rows", "plain_engine_rows", "speedup")
    }
    print(
        json.dumps(
            {
                "trees": args.trees,
                "splits": args.splits,
                "mean": mean,
                "student_over_plain_all_rows": round(mean["student"] / mean["plain_all_rows"], 4),
                "student_over_plain_engine_rows": round(
                    mean["student"] / mean["plain_engine_rows"], 4
                ),
                "deployable": sum(bool(row["deployable"]) for row in rows),
            }
        )
    )


if __name__ == "__main__":
    main()
