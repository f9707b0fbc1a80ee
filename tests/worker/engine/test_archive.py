"""Safe zip handling: contained paths, no links, caps on count and expanded size."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from worker.engine.archive import ArchiveLimits, contained, extract, is_zip, list_members
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
