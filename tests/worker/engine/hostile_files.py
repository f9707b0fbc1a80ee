"""Crafted hostile uploads, and a way to measure what reading them costs.

A member of gigabytes is built without compressing gigabytes: a chunk deflated
after a full flush compresses to the same bytes every time, so the stream is one
compressed chunk repeated. Building a 1 GiB member takes about a second (its CRC).
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFLATED = 8
STORED = 0
_DOS_DATE_1980 = 0x21


@dataclass
class Usage:
    """Wall-clock seconds and peak traced Python memory of a block."""

    seconds: float = 0.0
    peak_bytes: int = 0


@contextmanager
def measured() -> Iterator[Usage]:
    """Measure the block; tests pair it with ``pytest.mark.timeout`` so a hang fails them."""
    usage = Usage()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.monotonic()
    try:
        yield usage
    finally:
        usage.seconds = time.monotonic() - start
        usage.peak_bytes = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()


@dataclass(frozen=True)
class Member:
    """A zip member: ``chunk`` repeated ``repeats`` times, deflated or stored."""

    chunk: bytes
    repeats: int = 1
    method: int = DEFLATED

    @property
    def size(self) -> int:
        return len(self.chunk) * self.repeats

    def crc(self) -> int:
        crc = 0
        for _ in range(self.repeats):
            crc = zlib.crc32(self.chunk, crc)
        return crc

    def payload(self) -> bytes:
        if self.method == STORED:
            return self.chunk * self.repeats
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        first = deflate.compress(self.chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
        again = deflate.compress(self.chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
        return first + again * (self.repeats - 1) + deflate.flush()


def crafted_zip(path: Path, members: dict[str, Member | bytes]) -> Path:
    """Write a zip of ``members`` (bytes are stored as they are) to ``path``."""
    body = bytearray()
    directory = bytearray()
    for name, member in members.items():
        if isinstance(member, bytes):
            member = Member(member, method=STORED)
        data, encoded, offset, crc = member.payload(), name.encode(), len(body), member.crc()
        sizes = (crc, len(data), member.size, len(encoded))
        body += struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, member.method, 0, _DOS_DATE_1980, *sizes, 0
        )
        body += encoded + data
        directory += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            member.method,
            0,
            _DOS_DATE_1980,
            *sizes,
            0,
            0,
            0,
            0,
            0,
            offset,
        )
        directory += encoded
    count = len(members)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), len(body), 0)
    path.write_bytes(bytes(body + directory + end))
    return path
