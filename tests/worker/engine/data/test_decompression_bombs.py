"""Decompression bombs among transfer sets: refused from their headers, in bounded memory.

Each crafted file is inspected the way the API inspects an upload
(:func:`inspect_dataset`), in a fresh process whose peak memory is measured.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.app.databases import REPO

#: Peak memory an inspection may add over the interpreter with the readers imported.
MEMORY_BOUND_BYTES = 200 << 20
TIME_BOUND_S = 30.0

_MEASURE = """
import json, resource, sys, time
from worker.engine.data.summary import inspect_dataset
from worker.engine.errors import EngineError
import PIL.Image, PIL.PngImagePlugin, numpy
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started = time.monotonic()
try:
    inspect_dataset(sys.argv[1])
    outcome = {"error": None}
except EngineError as exc:
    outcome = {"error": exc.code, "message": exc.message, "field": exc.field}
outcome["seconds"] = time.monotonic() - started
outcome["added_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps(outcome))
"""


def inspect_in_fresh_process(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome


def zeros_npz(path: Path, rows: int, columns: int) -> Path:
    """A compressed ``.npz`` of float64 zeros, streamed out: the test never holds the array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (rows, columns)}
    )
    # One row of noise per block keeps the ratio (~900:1) under deflate's maximum (~1030:1),
    # so the zip's own header claims nothing a plain ratio cap of 1000 would refuse.
    block = np.zeros((4096, columns), np.float64)
    block[0] = np.random.default_rng(0).standard_normal(columns)
    row_block = block.tobytes()
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as npz,
        npz.open("inputs.npy", "w", force_zip64=True) as member,
    ):
        member.write(b"\x93NUMPY\x01\x00" + header.getvalue()[8:])
        for start in range(0, rows, 4096):
            member.write(row_block[: min(4096, rows - start) * columns * 8])
    return path


def test_npz_of_zeros_is_refused_from_its_header(tmp_path: Path) -> None:
    path = zeros_npz(tmp_path / "bomb.npz", rows=1_800_000, columns=100)
    ratio = 1_800_000 * 100 * 8 / path.stat().st_size
    assert path.stat().st_size < 2 << 20 and 500 < ratio < 1000, ratio  # ~1.4 GB of float64

    outcome = inspect_in_fresh_process(path)

    # Refused on the zip's own header (ratio) or the array's declared size, before reading.
    assert outcome["error"] in ("archive_unsafe", "dataset_invalid"), outcome
    assert "ratio" in outcome["message"] or "may expand to" in outcome["message"], outcome
    assert outcome["added_bytes"] < MEMORY_BOUND_BYTES, outcome
    assert outcome["seconds"] < TIME_BOUND_S, outcome
    print(f"npz bomb: {outcome['added_bytes'] >> 20} MiB, {outcome['seconds']:.2f} s")


def test_zip_of_black_pngs_is_refused_before_decoding(tmp_path: Path) -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (2300, 2300)).save(png, format="PNG", optimize=True)
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(24):
            archive.writestr(f"{('black', 'dark')[index % 2]}/{index}.png", png.getvalue())
    assert path.stat().st_size < 1 << 20

    outcome = inspect_in_fresh_process(path)

    assert outcome["error"] == "dataset_invalid", outcome
    assert outcome["field"] == "data.image_size", outcome
    assert "may expand to" in outcome["message"], outcome
    assert outcome["added_bytes"] < MEMORY_BOUND_BYTES, outcome
    assert outcome["seconds"] < TIME_BOUND_S, outcome
    print(f"png bomb: {outcome['added_bytes'] >> 20} MiB, {outcome['seconds']:.2f} s")


def test_an_ordinary_npz_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.npz"
    rng = np.random.default_rng(0)
    np.savez_compressed(path, inputs=rng.standard_normal((500, 8)), labels=np.arange(500) % 3)
    outcome = inspect_in_fresh_process(path)
    assert outcome["error"] is None, outcome
