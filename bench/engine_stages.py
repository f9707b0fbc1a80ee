"""Wall time of each engine stage for a small tabular job, beside a plain KD loop.

A random forest (skl2onnx) is trained on half of scikit-learn's
digits; the transfer set is the other half, unlabelled. One job runs through
``worker.engine.pipeline.run`` on the product's defaults; its ``stage`` events
mark where each stage begins, so the stages' wall times are the gaps between
them. The engine's import is timed in a fresh interpreter. In the same process a
plain KD loop (the job's student architecture, standardised inputs, cross-entropy
to the teacher's probabilities, the job's step count) gives the baseline for the
training stage: the ratio says what the engine's loop costs over the bare steps.

    python bench/engine_stages.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.worker.engine.factories import sklearn_forest_onnx  # noqa: E402
from worker.engine.pipeline import run  # noqa: E402
from worker.engine.spec import DistillationSpec  # noqa: E402
from worker.engine.training import Callbacks  # noqa: E402


def import_seconds() -> float:
    """Seconds a fresh interpreter takes to import the engine's pipeline (torch included)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import worker.engine.pipeline"], cwd=REPO, check=True)
    return time.perf_counter() - started


def teacher_job(folder: Path) -> tuple[Path, Path, np.ndarray]:
    """A forest teacher's ONNX file, its unlabelled transfer set, and those rows."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    half = len(x) // 2
    teacher, _ = sklearn_forest_onnx(x[:half], y[:half], folder / "teacher.onnx")
    data = folder / "transfer.npz"
    np.savez(data, inputs=x[half:])
    return teacher, data, x[half:]


def stage_seconds(marks: list[tuple[str, float]], ended: float) -> dict[str, float]:
    """The wall time of each stage, from the times its ``stage`` event came."""
    seconds: dict[str, float] = {}
    for (stage, at), (_, following) in zip(marks, [*marks[1:], ("end", ended)], strict=True):
        seconds[stage] = seconds.get(stage, 0.0) + following - at
    return seconds


def plain_loop_seconds(x: np.ndarray, teacher: Path, hidden: list[int], steps: int) -> float:
    """Seconds of ``steps`` bare KD steps of the same MLP on the teacher's probabilities."""
    import onnxruntime as ort
    import torch
    from torch import nn

    session = ort.InferenceSession(str(teacher), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    probabilities = torch.from_numpy(np.asarray(outputs[1], dtype=np.float32))
    inputs = torch.from_numpy((x - x.mean(0)) / (x.std(0) + 1e-6))
    layers: list[nn.Module] = []
    width = x.shape[1]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    model = nn.Sequential(*layers, nn.Linear(width, probabilities.shape[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    done = 0
    while done < steps:
        for rows in torch.randperm(len(inputs)).split(128):
            loss = -(probabilities[rows] * model(inputs[rows]).log_softmax(-1)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return time.perf_counter() - started


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    folder = Path(tempfile.mkdtemp(prefix="engine-stages-"))
    try:
        imported = import_seconds()
        teacher, data, rows = teacher_job(folder)
        marks: list[tuple[str, float]] = []

        def on_event(kind: str, payload: dict[str, Any]) -> None:
            if kind == "stage":
                marks.append((str(payload["stage"]), time.perf_counter()))

        spec = DistillationSpec.model_validate({"training": {"checkpoint_every_minutes": None}})
        started = time.perf_counter()
        result = run(
            spec,
            teacher_path=teacher,
            dataset_path=data,
            out_dir=folder / "out",
            callbacks=Callbacks(on_event=on_event),
        )
        ended = time.perf_counter()
        stages = stage_seconds(marks, ended)
        config = json.loads((folder / "out" / "student_config.json").read_text())
        plain = plain_loop_seconds(rows, teacher, config["hidden_sizes"], result.steps)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    total = ended - started
    print(f"engine import (fresh interpreter): {imported:6.2f} s")
    for stage, seconds in stages.items():
        print(f"  {stage:<16} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    print(f"  {'whole run':<16} {total:7.2f} s  ({result.steps} steps)")
    training = stages.get("training", 0.0)
    print(
        f"plain KD loop, same student and steps: {plain:.2f} s; "
        f"engine training stage / plain loop: {training / max(plain, 1e-9):.2f}x"
    )
    print(
        json.dumps(
            {
                "import_s": round(imported, 3),
                "stages_s": {k: round(v, 3) for k, v in stages.items()},
                "total_s": round(total, 3),
                "steps": result.steps,
                "plain_loop_s": round(plain, 3),
                "training_vs_plain": round(training / max(plain, 1e-9), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
