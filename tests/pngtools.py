"""Chunk-level PNG helpers for tests: take files apart and put them back together (with fresh CRCs)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def iter_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) of every chunk after the signature."""
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        yield data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length


def chunk(ctype: bytes, body: bytes = b"") -> bytes:
    """One chunk with its length and a correct CRC."""
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def without_chunks(data: bytes, *drop: bytes) -> bytes:
    """The file rebuilt without chunks of the `drop` types (every CRC recomputed)."""
    return SIGNATURE + b"".join(chunk(t, b) for t, b in iter_chunks(data) if t not in drop)
