"""Wall time of the student ladder against one auto student, on the same data, in one process.

A random forest (skl2onnx) is trained on its own rows; its transfer set is other,
unlabelled rows of the same synthetic classification task. Three jobs run through
``worker.engine.pipeline.run`` with the product's defaults otherwise:

1. single: one student of the size ``auto`` designs (``student.ladder`` false);
2. ladder: the default ladder, which stops at the first rung that meets the criteria;
3. full: the ladder made to climb every rung (a ``student.max_latency_ms`` no rung can
   meet), the worst case.

It prints each job's wall time and its training seconds, the ratios to the single
student (target for the full five-rung climb: under 2.5x), and one JSON line.

With ``--encoder``, the teacher is all-MiniLM-L6-v2 (the folder a package ships, zipped as
a user uploads it) and the transfer set ``--sentences`` sentences from installed packages
(:mod:`tests.worker.engine.hf.encoder_job`); its ladder is of encoders cut from the teacher
at geometric compressions from 42.7 down to the default 10, four rungs. No rung meets the
default bar (cosine 0.9) on two CPU cores, so the default climb is the full one, and only
the single student and the ladder run.

    python bench/ladder.py
    python bench/ladder.py --samples 8000 --trees 300
    python bench/ladder.py --encoder --sentences 3000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.worker.engine.factories import sklearn_forest_onnx
from worker.engine.pipeline import run
from worker.engine.spec import DistillationSpec

#: The student figure each job prints, by task.
METRIC = {"classification": "accuracy", "embedding": "cosine"}


def forest_job(folder: Path, samples: int, trees: int) -> tuple[Path, Path]:
    """A forest teacher's ONNX file and an unlabelled transfer set of other rows."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=samples,
        n_features=20,
        n_informative=6,
        n_redundant=2,
        n_classes=3,
        class_sep=2.0,
        random_state=0,
    )
    x = x.astype(np.float32)
    half = samples // 2
    teacher, _ = sklearn_forest_onnx(x[:half], y[:half], folder / "forest.onnx", n_estimators=trees)
    transfer = folder / "transfer.npz"
    with open(transfer, "wb") as f:
        np.savez(f, inputs=x[half:])
    return teacher, transfer


def encoder_job(folder: Path, sentences: int) -> tuple[Path, Path]:
    """all-MiniLM-L6-v2, zipped, and ``sentences`` sentences from installed packages."""
    from tests.worker.engine.factories import write_jsonl, zip_folder
    from tests.worker.engine.hf.encoder_job import model_folder, split_sentences

    _, transfer = split_sentences(0, sentences)
    return (
        zip_folder(model_folder(), folder / "teacher.zip"),
        write_jsonl(folder / "transfer.jsonl", transfer),
    )


def timed_job(
    name: str, spec: dict[str, Any], teacher: Path, transfer: Path, folder: Path
) -> dict[str, Any]:
    """One job's wall time, training seconds and what it kept."""
    started = time.perf_counter()
    result = run(
        DistillationSpec.model_validate({**spec, "training": {"checkpoint_every_minutes": None}}),
        teacher_path=teacher,
        dataset_path=transfer,
        out_dir=folder / name,
        work_dir=folder / f"{name}-work",
    )
    wall = time.perf_counter() - started
    ladder = result.metrics["ladder"]
    training = (
        sum(rung["seconds"] for rung in ladder["rungs"])
        if ladder
        else result.metrics["training"]["seconds"]
    )
    return {
        "wall_s": round(wall, 2),
        "training_s": round(training, 2),
        "rungs": len(ladder["rungs"]) if ladder else 1,
        "student_parameters": result.metrics["student"]["parameters"],
        "student_metric": result.metrics["student"][METRIC[result.metrics["task"]]],
        "deployable": result.deployable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--encoder", action="store_true", help="all-MiniLM-L6-v2 on sentences")
    parser.add_argument("--sentences", type=int, default=3000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-ladder-"))
    try:
        if args.encoder:
            teacher, transfer = encoder_job(folder, args.sentences)
        else:
            teacher, transfer = forest_job(folder, args.samples, args.trees)
        jobs: dict[str, dict[str, Any]] = {
            "single": {"student": {"ladder": False}},
            "ladder": {},
        }
        if not args.encoder:
            jobs["full"] = {"student": {"max_latency_ms": 1e-6}}
        results = {
            name: timed_job(name, spec, teacher, transfer, folder) for name, spec in jobs.items()
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    single = results["single"]
    for name, figures in results.items():
        print(
            f"{name:>7}: {figures['wall_s']:8.1f} s wall, {figures['training_s']:8.1f} s training, "
            f"{figures['rungs']} rung(s), student {figures['student_parameters']:,} parameters, "
            f"{'cosine' if args.encoder else 'accuracy'} {figures['student_metric']:.4f}"
        )
    for name in [name for name in results if name != "single"]:
        ratio = results[name]["wall_s"] / single["wall_s"]
        training = results[name]["training_s"] / single["training_s"]
        target = "  (target < 2.5x)" if name == "full" or args.encoder else ""
        print(f"{name} / single: {ratio:.2f}x wall, {training:.2f}x training{target}")
    setup = (
        {"sentences": args.sentences}
        if args.encoder
        else {"samples": args.samples, "trees": args.trees}
    )
    print(json.dumps({**setup, **results}))


if __name__ == "__main__":
    main()
