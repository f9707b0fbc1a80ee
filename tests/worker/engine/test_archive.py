"""Safe zip handling: contained paths, no links, caps on count, expanded size and ratio."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from tests.worker.engine.hostile_files import Member, crafted_zip, measured
from worker.engine.archive import (
    TEACHER_LIMITS,
    ArchiveLimits,
    ExpansionBudget,
    contained,
    extract,
    extract_members,
    is_zip,
    list_members,
    open_member,
)
from worker.engine.errors import ArchiveUnsafe


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extracts_a_plain_bundle(tmp_path: Path) -> None:
    z = _zip(tmp_path / "ok.zip", {"model/graph.onnx": b"g", "model/weights.data": b"w" * 10})
    assert is_zip(z)
    dest = extract(z, tmp_path / "out")
    assert (dest / "model" / "weights.data").read_bytes() == b"w" * 10


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/passwd", "a/../../evil", "C:/x", "a\\..\\b"])
def test_refuses_escaping_members(tmp_path: Path, name: str) -> None:
    z = _zip(tmp_path / "bad.zip", {name: b"x"})
    with pytest.raises(ArchiveUnsafe):
        extract(z, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_refuses_symlink_members(tmp_path: Path) -> None:
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveUnsafe, match="symbolic link"):
        list_members(z)


def test_caps_member_count_and_total_size(tmp_path: Path) -> None:
    z = _zip(tmp_path / "many.zip", {f"f{i}": b"x" for i in range(5)})
    with pytest.raises(ArchiveUnsafe, match="members"):
        list_members(z, ArchiveLimits(max_members=4))
    big = _zip(tmp_path / "big.zip", {"a": b"x" * 1000, "b": b"y" * 1000})
    with pytest.raises(ArchiveUnsafe, match="expands"):
        list_members(big, ArchiveLimits(max_total_bytes=1500))


def test_refuses_a_compression_bomb(tmp_path: Path) -> None:
    z = _zip(tmp_path / "bomb.zip", {"zeros": b"\0" * (8 << 20)})
    with pytest.raises(ArchiveUnsafe, match="compression ratio"):
        list_members(z)


def test_stops_at_the_cap_while_writing_even_if_headers_lie(tmp_path: Path) -> None:
    z = _zip(tmp_path / "liar.zip", {"a": b"x" * 5000})
    # Patch the central directory's declared size down, as a hostile zip would.
    data = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.infolist()[0]
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    z.write_bytes(bytes(data))
    with pytest.raises((ArchiveUnsafe, zipfile.BadZipFile)):
        extract(z, tmp_path / "out", ArchiveLimits(max_member_bytes=100, max_ratio=1e9))
    assert info.file_size == 5000


def test_not_a_zip(tmp_path: Path) -> None:
    p = tmp_path / "x.zip"
    p.write_bytes(b"hello")
    assert not is_zip(p)
    with pytest.raises(ArchiveUnsafe, match="not a readable zip"):
        list_members(p)


def test_contained(tmp_path: Path) -> None:
    assert contained(tmp_path, "a/b.bin") == (tmp_path / "a" / "b.bin").resolve()
    with pytest.raises(ArchiveUnsafe):
        contained(tmp_path, "../b.bin")
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(ArchiveUnsafe):
        contained(tmp_path, "link/passwd")


def test_teacher_archives_allow_a_hundredfold_ratio_above_the_floor(tmp_path: Path) -> None:
    # 8 MiB of zeros deflates about a thousandfold: harmless as the 1 MiB of a config, not more.
    small = crafted_zip(tmp_path / "small.zip", {"zeros": Member(bytes(256 << 10), 4)})
    assert [i.filename for i in list_members(small, TEACHER_LIMITS)] == ["zeros"]
    big = crafted_zip(tmp_path / "big.zip", {"zeros": Member(bytes(256 << 10), 32)})
    list_members(big)
    with pytest.raises(ArchiveUnsafe, match="compression ratio"):
        list_members(big, TEACHER_LIMITS)


@pytest.mark.timeout(120)
def test_a_header_claiming_a_large_compressed_size_is_not_trusted(tmp_path: Path) -> None:
    bomb = crafted_zip(tmp_path / "liar.zip", {"zeros": Member(bytes(256 << 10), 4096)})
    data = bytearray(bomb.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    # "1 GiB from 2 GiB compressed": a fine ratio, in an archive of 1.1 MiB.
    data[cd + 20 : cd + 24] = (2**31).to_bytes(4, "little")
    bomb.write_bytes(bytes(data))
    with measured() as usage:
        with pytest.raises(ArchiveUnsafe, match="compression ratio"):
            list_members(bomb, TEACHER_LIMITS)
        with pytest.raises(ArchiveUnsafe):
            extract(bomb, tmp_path / "out", TEACHER_LIMITS)
    assert not (tmp_path / "out").exists()
    assert usage.peak_bytes < 16 * 2**20 and usage.seconds < 10


def test_reads_count_against_one_budget_per_archive(tmp_path: Path) -> None:
    z = _zip(tmp_path / "a.zip", {"a": b"x" * 3000})
    limits = ArchiveLimits(max_total_bytes=5000, ratio_floor_bytes=0, max_ratio=1e9)
    (info,) = list_members(z, limits)
    budget = ExpansionBudget(z, limits)
    with open_member(z, info, budget) as f:
        assert f.read() == b"x" * 3000
    # The header is the same; the second read is what passes the budget.
    with open_member(z, info, budget) as f, pytest.raises(ArchiveUnsafe, match="budget"):
        f.read()


def test_a_member_is_stopped_at_its_ratio_while_it_is_read(tmp_path: Path) -> None:
    z = _zip(tmp_path / "a.zip", {"a": b"x" * 100_000})
    (info,) = list_members(z)
    strict = ExpansionBudget(z, ArchiveLimits(max_ratio=2.0, ratio_floor_bytes=0))
    with open_member(z, info, strict) as f, pytest.raises(ArchiveUnsafe, match="expands past"):
        f.read()


def test_corrupt_member_data_is_archive_unsafe(tmp_path: Path) -> None:
    z = _zip(tmp_path / "a.zip", {"a": bytes(range(256)) * 64})
    data = bytearray(z.read_bytes())
    start = data.find(b"PK\x03\x04") + 30 + 1
    data[start + 10 : start + 40] = bytes(30)
    z.write_bytes(bytes(data))
    with pytest.raises(ArchiveUnsafe, match="corrupt"):
        extract(z, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_members_writes_only_the_names_given(tmp_path: Path) -> None:
    z = _zip(tmp_path / "b.zip", {"m/graph.onnx": b"g", "m/w.bin": b"w", "m/junk": b"j" * 9})
    dest = extract_members(z, tmp_path / "out", ["m/graph.onnx", "m/w.bin"])
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "m/graph.onnx",
        "m/w.bin",
    ]
    with pytest.raises(ArchiveUnsafe, match="no file member 'm/absent'"):
        extract_members(z, tmp_path / "again", ["m/graph.onnx", "m/absent"])
    assert not (tmp_path / "again").exists()
