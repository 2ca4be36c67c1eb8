"""Bounded reader for PNG text (tEXt/zTXt/iTXt) and eXIf chunks.

We walk the chunk list ourselves instead of using Pillow's ``info`` because
Pillow only sees text chunks placed after IDAT once the pixels are decoded,
keeps every text value in memory in full, and raises on oversized compressed
chunks. Here every value is capped (decompression included), so a hostile
100 MB text chunk costs at most ``MAX_VALUE_BYTES``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Generator metadata (ComfyUI workflows, A1111 parameters) is well under this;
# anything longer is truncated and only searched, never fully parsed.
MAX_VALUE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 8 << 20
MAX_CHUNKS = 4096


@dataclass(frozen=True)
class PngText:
    key: str
    value: str
    chunk: str  # "tEXt" | "zTXt" | "iTXt"
    truncated: bool = False


def _inflate(data: bytes, limit: int) -> tuple[bytes, bool]:
    """zlib-decompress at most ``limit`` bytes; returns (output, truncated)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error:
        return b"", False
    return out, bool(d.unconsumed_tail)


def _split_key(body: bytes) -> tuple[str, bytes] | None:
    nul = body.find(b"\x00", 0, 80)  # PNG keywords are 1-79 bytes
    if nul <= 0:
        return None
    return body[:nul].decode("latin-1"), body[nul + 1 :]


def _parse_text(ctype: bytes, body: bytes, limit: int) -> PngText | None:
    split = _split_key(body)
    if split is None:
        return None
    key, rest = split
    if ctype == b"tEXt":
        truncated = len(rest) > limit
        return PngText(key, rest[:limit].decode("latin-1"), "tEXt", truncated)
    if ctype == b"zTXt":
        if not rest or rest[0] != 0:  # 0 = deflate, the only method defined
            return None
        raw, truncated = _inflate(rest[1:], limit)
        return PngText(key, raw.decode("latin-1"), "zTXt", truncated)
    # iTXt: flag, method, language\0, translated keyword\0, UTF-8 text
    if len(rest) < 2:
        return None
    compressed, method = rest[0], rest[1]
    parts = rest[2:].split(b"\x00", 2)
    if len(parts) != 3:
        return None
    text = parts[2]
    if compressed:
        if method != 0:
            return None
        raw, truncated = _inflate(text, limit)
    else:
        raw, truncated = text[:limit], len(text) > limit
    return PngText(key, raw.decode("utf-8", errors="replace"), "iTXt", truncated)


def iter_png_chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (type, body) for each chunk; stops quietly at truncation or IEND."""
    if not data.startswith(PNG_SIGNATURE):
        return
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    for _ in range(MAX_CHUNKS):
        if pos + 8 > len(data):
            return
        (length,) = struct.unpack_from(">I", data, pos)
        ctype = bytes(view[pos + 4 : pos + 8])
        start, end = pos + 8, pos + 8 + length
        if end + 4 > len(data):
            return
        yield ctype, view[start:end]
        if ctype == b"IEND":
            return
        pos = end + 4  # skip CRC: a wrong checksum does not make metadata less telling


def read_png_metadata(data: bytes) -> tuple[list[PngText], bytes | None]:
    """All text chunks (before and after IDAT) and the raw eXIf payload, bounded."""
    texts: list[PngText] = []
    exif: bytes | None = None
    budget = MAX_TOTAL_BYTES
    for ctype, body in iter_png_chunks(data):
        if ctype in (b"tEXt", b"zTXt", b"iTXt") and budget > 0:
            # Copy at most twice the value cap: enough input to fill the cap for
            # any real text, never the whole of a hostile chunk.
            item = _parse_text(ctype, bytes(body[: MAX_VALUE_BYTES * 2]), min(MAX_VALUE_BYTES, budget))
            if item is not None:
                texts.append(item)
                budget -= len(item.value)
        elif ctype == b"eXIf" and exif is None and len(body) <= MAX_VALUE_BYTES:
            exif = bytes(body)
    return texts, exif
