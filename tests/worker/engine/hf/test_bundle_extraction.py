"""A transformers bundle is extracted member by member: only the files its folder reads."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.worker.engine.hf.factories import CPU
from tests.worker.engine.hostile_files import Member, crafted_zip, measured
from worker.engine.inspection import extract_hf_bundle
from worker.engine.teachers import load_teacher


def _files_under(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()
    }


def _folder_members(folder: Path, prefix: str) -> dict[str, Member | bytes]:
    return {f"{prefix}/{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.timeout(300)
def test_an_unreferenced_2gib_member_never_reaches_the_disk(
    models: dict[str, Any], tmp_path: Path
) -> None:
    folder: Path = models["classifier_dir"]
    # 2 GiB that nothing in the folder names, compressing 60 times (within the ratio cap).
    noise = random.Random(0).randbytes(16 << 10)
    junk = Member(noise + bytes((1 << 20) - len(noise)), 2048)
    bundle = crafted_zip(
        tmp_path / "clf.zip", {**_folder_members(folder, "clf"), "clf/junk.safetensors": junk}
    )
    assert bundle.stat().st_size < 40 * 2**20
    needed = {f"clf/{p.name}": p.stat().st_size for p in folder.iterdir() if p.is_file()}

    root = extract_hf_bundle(bundle, tmp_path / "out")
    assert root == tmp_path / "out" / "clf"
    assert _files_under(tmp_path / "out") == needed

    work = tmp_path / "work"
    with measured() as usage:
        teacher = load_teacher(bundle, device=CPU, work_dir=work)
    written = _files_under(work)
    assert not any(name.endswith("junk.safetensors") for name in written)
    assert sum(written.values()) <= sum(needed.values())
    assert teacher.signature.num_classes == 3 and usage.seconds < 120


def test_a_bundle_without_a_transformers_folder_is_refused(tmp_path: Path) -> None:
    from worker.engine.errors import TeacherInvalid

    bundle = crafted_zip(tmp_path / "empty.zip", {"notes/readme.md": b"nothing to load"})
    with pytest.raises(TeacherInvalid, match="no transformers folder"):
        extract_hf_bundle(bundle, tmp_path / "out")
