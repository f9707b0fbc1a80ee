"""inspect_dataset: the summary the API shows, read without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.worker.engine.data.factories import write_csv, write_jsonl, write_parquet
from tests.worker.engine.factories import write_image_folders_zip, write_npz
from worker.engine.data import inspect_dataset

ROOT = Path(__file__).resolve().parents[4]


def test_inspect_dataset(tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digit_arrays
    path = write_npz(tmp_path / "d.npz", x.reshape(-1, 1, 8, 8), y)
    info = inspect_dataset(path)
    assert info == {
        "format": "npz",
        "rows": len(x),
        "modality": "image",
        "feature_shape": [1, 8, 8],
        "has_labels": True,
        "labelled_rows": len(x),
        "label_kind": "class",
        "num_classes": 10,
        "class_names": None,
        "bytes": path.stat().st_size,
    }
    info = inspect_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1.5}]))
    assert info["modality"] == "text" and info["feature_shape"] is None
    assert info["label_kind"] == "value" and info["num_classes"] is None


def test_data_and_inspect_do_not_import_torch(
    tmp_path: Path, digit_arrays: tuple[np.ndarray, np.ndarray]
) -> None:
    from safetensors.numpy import save_file

    x, y = digit_arrays
    safetensors_path = tmp_path / "f.safetensors"
    save_file({"inputs": x[:20], "labels": y[:20]}, str(safetensors_path))
    paths = [
        write_npz(tmp_path / "a.npz", x[:20], y[:20]),
        write_csv(tmp_path / "b.csv", x[:20], y[:20]),
        write_parquet(tmp_path / "c.parquet", {"a": [1.0, 2.0], "label": ["x", "y"]}),
        write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}]),
        write_image_folders_zip(
            tmp_path / "e.zip", x[:4].reshape(-1, 8, 8), np.array([0, 0, 1, 1])
        ),
        safetensors_path,
    ]
    code = (
        "import sys\n"
        "from worker.engine.data import inspect_dataset\n"
        f"for path in {[str(path) for path in paths]!r}:\n"
        "    inspect_dataset(path)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
