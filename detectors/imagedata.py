"""Safe, lazy image decoding shared by hashing and detectors.

Everything that turns untrusted bytes into pixels goes through here so the
limits (pixel count, dimensions, truncation) are enforced in one place.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image, PngImagePlugin

from detectors.regular_file import FileRefused, read_regular

try:  # HEIC/HEIF is what phones upload; Pillow alone cannot decode it
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - optional at import, a dependency in pyproject
    pass

# Pillow's own bomb check (fail above ~179 Mpx) stays as a backstop; our
# configurable limit is checked from the header first. Its warning (above
# ~89 Mpx) is silenced: our limit decides, and in the CLI the warning was a
# multi-line dump on stderr for a file we then accepted or refused anyway.

# The formats the fetch stage's magic sniffing lets in
# (``streams.fetch.sniff_image_type``; MPO opens as JPEG). Anything else is
# refused before its plugin runs: some decode inside ``Image.open`` (an ICO
# or ICNS entry is a whole embedded PNG, decoded before any of our limits
# could look at its size).
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "HEIF", "AVIF")

# What Pillow names a JPEG it opened: a JPEG with an MPF segment (APP2,
# "MPF\0") declaring two or more pictures opens as "MPO". Its first picture is
# decoded by libjpeg like any JPEG, so every JPEG rule (DCT coefficients of a
# multi-scan file counted, DCT-scaled decodes) applies to it: compared with
# "JPEG" alone, a progressive MPO's coefficients went uncounted (a 700 KB
# 12000x5000 file passed at 228 MiB and peaked at 631 MiB).
JPEG_FORMATS = frozenset({"JPEG", "MPO"})


@functools.cache
def open_formats() -> tuple[str, ...]:
    """The accepted formats Pillow has a plugin for here: ``Image.open``
    raises KeyError for a name it has none for (AVIF needs Pillow >= 11.2
    or pillow-heif's opener)."""
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


class ImageRejected(ValueError):
    """The bytes are not an image we are willing to decode; ``reason`` is
    a short machine-readable code, the message is for humans."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# Scans a JPEG may have by default (``decode.max_jpeg_scans`` sets
# ``DecodeLimits.max_jpeg_scans``). libjpeg runs every scan over the whole
# image: a progressive file has about 10, while 200,000 tiny ones (3 MB)
# cost 54 s of decoding for a 2000x2000 picture.
MAX_JPEG_SCANS = 100


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 100_000_000  # 50-200 MP phone cameras exist; Pillow refuses > ~179 MP regardless
    max_dimension: int = 16_384
    max_bytes: int = 25 * 1024 * 1024
    # Decoded bytes one image may cost at its peak (``decode_cost``), checked
    # from the header before any pixel is decoded. A 43-byte GIF can declare a
    # 96 MP canvas and a 390 KB PNG 81 MP of RGBA; the pixel cap alone lets
    # both through. JPEGs above it are decoded reduced (DCT scaling) instead.
    max_decode_bytes: int = 320 * 1024 * 1024
    max_jpeg_scans: int = MAX_JPEG_SCANS


# Pillow holds RGB as 4 bytes a pixel (RGBX), like every mode of 2-4 bands
# and the 32-bit ones; only these take less.
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RGB_BYTES = 4
_WIDE_SCALE_BYTES = 4
# A WebP decode goes through libwebp's animation decoder (Pillow >= 10): its
# RGBA canvas and the copy of the frame it returns, on top of the image.
_WEBP_DECODER_BYTES = 12


def decode_cost(img: Image.Image) -> int:
    """Bytes a decode of ``img`` holds at its peak (only the first frame of
    an animation is ever decoded here): Pillow's pixels in the file's mode,
    the RGB copy every analysis ends in when that mode is not RGB, and a WebP
    decoder's own buffers; 16-bit and float pixels add the 32-bit copy they
    are scaled in (``_eight_bit``). Measured peaks of 64 MP files: RGB PNG 248 MB
    (counted: 256), grey PNG 309 MB (320), lossless WebP 980 MB (1,024)."""
    w, h = img.size
    per_pixel = _STORED_BYTES.get(img.mode, 4) + (0 if img.mode == "RGB" else _RGB_BYTES)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        per_pixel += _WIDE_SCALE_BYTES
    if (img.format or "").upper() == "WEBP":
        per_pixel += _WEBP_DECODER_BYTES
    return w * h * per_pixel


_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)


def _jpeg_multi_scan(data: bytes) -> bool:
    """Whether libjpeg decodes this JPEG from a whole-image coefficient
    buffer: progressive (SOF2/6/10/14), or a first scan that carries fewer
    components than the frame (non-interleaved sequential). Walks the marker
    segments up to the first SOS; anything unreadable counts as multi-scan."""
    pos, n = 2, len(data)
    components = 0
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD9)):  # standalone markers: no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _PROGRESSIVE_SOF:
            return True
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 9 < n:
            components = data[pos + 9]
        if marker == 0xDA:
            return pos + 4 < n and data[pos + 4] < components
        pos += 2 + length
    return True


def jpeg_multi_scan(data: bytes) -> bool:
    """Whether ``data`` is a JPEG that libjpeg decodes scan by scan from a
    whole-image coefficient buffer (progressive, or non-interleaved): its
    decode costs every scan again over the whole image, so even a small
    picture of this kind is no job for an event loop. False for other bytes."""
    return data.startswith(b"\xff\xd8") and _jpeg_multi_scan(data)


# Marker segments counted at most: real files have a few dozen (a few
# hundred with a chunked ICC profile or extended XMP). A walk without this
# bound costs a Python step per 4-byte segment, and one that stopped without
# refusing would let scans hide behind a pile of comments.
MAX_JPEG_SEGMENTS = 10_000

# The next marker: 0xFF then neither a stuffed zero, a fill 0xFF nor a
# restart marker (those three occur inside entropy-coded data). No
# repetition in the pattern, so the search stays linear on runs of 0xFF.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_STANDALONE = (0x01, 0xD8)  # TEM, SOI: no length field


def jpeg_scan_count(data: bytes, limit: int = MAX_JPEG_SCANS) -> tuple[int, int]:
    """(scans, marker segments) of the JPEG in ``data`` up to its EOI, each
    counted no further than one past its bound (``limit``,
    ``MAX_JPEG_SEGMENTS``): linear in the file, and bounded work for a
    hostile one. Segment payloads are skipped by their length, so an EXIF
    thumbnail's markers are not counted; entropy-coded data and garbage
    between segments are skipped to the next marker, as libjpeg does."""
    scans = segments = 0
    pos = 2
    while scans <= limit and segments <= MAX_JPEG_SEGMENTS:
        m = _JPEG_MARKER.search(data, pos)
        if m is None:
            break
        marker = data[m.start() + 1]
        if marker == 0xD9:  # EOI: libjpeg reads no further
            break
        segments += 1
        pos = m.end()
        if marker in _STANDALONE:
            continue
        if marker == 0xDA:
            scans += 1
        pos += int.from_bytes(data[pos:pos + 2], "big")
    return scans, segments


def check_jpeg_scans(data: bytes, max_scans: int = MAX_JPEG_SCANS) -> None:
    """``ImageRejected`` for a JPEG with more scans (than ``max_scans``) or
    marker segments than a real picture has; nothing for other bytes. Decided
    before Pillow parses the header, whose marker loop is Python too."""
    if not data.startswith(b"\xff\xd8"):
        return
    scans, segments = jpeg_scan_count(data, max_scans)
    if scans > max_scans:
        raise ImageRejected("too_many_scans", f"JPEG has more than {max_scans} scans; each is decoded over the "
                            "whole image (real files have about 10; decode.max_jpeg_scans)")
    if segments > MAX_JPEG_SEGMENTS:
        raise ImageRejected("too_many_segments", f"JPEG has more than {MAX_JPEG_SEGMENTS} marker segments "
                            "(real files have a few dozen)")


# Pillow reads the structure of a PNG, a GIF up to its first picture, and an
# RLE-compressed BMP's pixels one Python step at a time, outside any pixel
# bound: each walk below is counted before Pillow starts, stopping one past
# its bound, so a hostile file costs bounded work here and is refused.

# PNG chunks up to IEND. Real files have a few dozen, plus one IDAT per 8 KiB
# of pixels (3,200 in a 25 MiB file) or, from a streaming encoder, one per
# row (up to 16,384, ~31,000 interlaced). Pillow handles each in Python, on
# every open (an ImageData opens a file three or four times): 1.5 million
# empty chunks (18 MB) cost 14 s and 590 MB, for a 300x300 picture; at this
# bound, 3-5 s and 170 MB at most. (A picture of 100,000 tiny text chunks is
# still analysed, in a thread: ``streams.stage.MAX_INLINE_PNG_CHUNKS``.)
MAX_PNG_CHUNKS = 200_000

# Steps Pillow takes through a GIF before its first picture: each extension,
# each of its data sub-blocks, each stray byte. Real files have a handful (an
# XMP packet, read as sub-blocks, a few thousand). Pillow keeps every comment
# sub-block as a bytes object: 12 million 1-byte ones (24 MB) held 1.1 GB for
# a 10x10 picture that the decode budget counted as nothing.
MAX_GIF_STEPS = 65_536

# Pixels of an RLE-compressed BMP: Pillow's RLE decoder is Python, about
# 110 ns a pixel at worst (a 17 KB 16384x4096 RLE8 file took 7.3 s a decode,
# holding the GIL). Real RLE bitmaps are icons and old screenshots.
MAX_RLE_BMP_PIXELS = 4_000_000


# Photoshop resource blocks ("8BIM") in a JPEG's APP13 segments, which
# Pillow's header parse reads one by one in Python (~1.3 us each). Real files
# carry a few dozen; 2 million 12-byte ones (24 MB) cost 2.7 s an open, three
# or four opens an analysis, for a 300x300 picture.
MAX_PHOTOSHOP_BLOCKS = 10_000

# Strips or tiles of a TIFF's first picture: Pillow makes and decodes each
# uncompressed one in Python (~20 us). Real files have one strip per row at
# most (16,384) or 256-px tiles (4,096 in a 16384x16384 picture); 262,144
# 16-px tiles of an 8192x8192 file (2 MB, all pointing at the same bytes)
# cost 1.3 s an open and 4 s a decode.
MAX_TIFF_BLOCKS = 65_536


def jpeg_photoshop_blocks_over(data: bytes, limit: int = MAX_PHOTOSHOP_BLOCKS) -> bool:
    """Whether the APP13 "Photoshop 3.0" segments Pillow parses (those
    before the first scan) hold more than ``limit`` resource blocks, counted
    by their "8BIM" signatures (at C speed: a chance match in a block's data
    only counts one too many). False for other bytes."""
    if not data.startswith(b"\xff\xd8"):
        return False
    blocks, pos = 0, 2
    for _ in range(MAX_JPEG_SEGMENTS + 1):  # ``check_jpeg_scans`` refuses more
        m = _JPEG_MARKER.search(data, pos)
        if m is None:
            return False
        marker = data[m.start() + 1]
        if marker in (0xD9, 0xDA):  # EOI, or the first scan: Pillow's header parse ends there
            return False
        pos = m.end()
        if marker in _STANDALONE:
            continue
        length = int.from_bytes(data[pos:pos + 2], "big")
        if marker == 0xED and data.startswith(b"Photoshop 3.0\x00", pos + 2):
            blocks += data.count(b"8BIM", pos + 2, pos + length)
            if blocks > limit:
                return True
        pos += length
    return False


def _tiff_blocks(data: bytes) -> int:
    """Strips or tiles (the larger count given) of the first picture of the
    TIFF or BigTIFF in ``data``, read from its first directory; 0 for other
    bytes or a directory that cannot be read (Pillow then decides)."""
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        big = False
    elif data[:4] in (b"II+\x00", b"MM\x00+"):
        big = True
    else:
        return 0
    order = "little" if data[:2] == b"II" else "big"
    if big:
        ifd = int.from_bytes(data[8:16], order)
        count, size, first = int.from_bytes(data[ifd:ifd + 8], order), 20, ifd + 8
    else:
        ifd = int.from_bytes(data[4:8], order)
        count, size, first = int.from_bytes(data[ifd:ifd + 2], order), 12, ifd + 2
    most = 0
    for i in range(min(count, 65_535)):  # bounded work: a real directory has a few dozen entries
        at = first + i * size
        if at + size > len(data):
            break
        tag = int.from_bytes(data[at:at + 2], order)
        if tag in (273, 279, 324, 325):  # Strip/TileOffsets, Strip/TileByteCounts
            most = max(most, int.from_bytes(data[at + 4:at + (12 if big else 8)], order))  # its count
    return most


def png_chunks_over(data: bytes, limit: int = MAX_PNG_CHUNKS) -> bool:
    """Whether ``data`` is a PNG with more than ``limit`` chunks up to its
    IEND, counted no further than one past it. False for other bytes."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    pos, end = 8, len(data)
    for _ in range(limit + 1):
        if pos + 8 > end or data[pos + 4:pos + 8] == b"IEND":
            return False
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return True


def gif_steps_over(data: bytes, limit: int = MAX_GIF_STEPS) -> bool:
    """Whether ``data`` is a GIF whose blocks before its first image
    descriptor take Pillow more than ``limit`` steps (an extension, one of its
    sub-blocks, a stray byte each), walked as Pillow walks them and no
    further than one past the bound. False for other bytes."""
    if not data.startswith((b"GIF87a", b"GIF89a")) or len(data) < 13:
        return False
    flags = data[10]
    pos = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # the global colour table
    end, steps = len(data), 0
    while pos < end:
        steps += 1
        if steps > limit:
            return True
        byte = data[pos]
        if byte in (0x2C, 0x3B):  # an image descriptor, the trailer: Pillow stops here
            return False
        if byte != 0x21:  # not an extension: Pillow skips it a byte at a time
            pos += 1
            continue
        pos += 2  # introducer and label, then sub-blocks up to a zero length
        while pos < end:
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
            steps += 1
            if steps > limit:
                return True
    return False


def check_structure(data: bytes) -> None:
    """``ImageRejected`` for a PNG, GIF, JPEG, TIFF or BMP whose structure costs Pillow
    more Python steps than a real picture of any size needs (see the bounds
    above); nothing for other bytes. Decided before Pillow opens it."""
    if png_chunks_over(data):
        raise ImageRejected("too_many_segments", f"PNG has more than {MAX_PNG_CHUNKS} chunks "
                            "(real files have a few dozen, or one per 8 KiB of pixels)")
    if gif_steps_over(data):
        raise ImageRejected("too_many_segments", f"GIF has more than {MAX_GIF_STEPS} extension blocks before its "
                            "first picture (real files have a handful)")
    if jpeg_photoshop_blocks_over(data):
        raise ImageRejected("too_many_segments", f"JPEG has more than {MAX_PHOTOSHOP_BLOCKS} Photoshop resource "
                            "blocks (real files have a few dozen)")
    blocks = _tiff_blocks(data)
    if blocks > MAX_TIFF_BLOCKS:
        raise ImageRejected("too_many_segments", f"TIFF has {blocks} strips or tiles, more than {MAX_TIFF_BLOCKS} "
                            "(real files have at most one a row, or 256-px tiles)")
    if data.startswith(b"BM") and len(data) >= 34 and int.from_bytes(data[14:18], "little") >= 40:
        w = int.from_bytes(data[18:22], "little", signed=True)
        h = int.from_bytes(data[22:26], "little", signed=True)
        compression = int.from_bytes(data[30:34], "little")
        if compression in (1, 2) and abs(w) * abs(h) > MAX_RLE_BMP_PIXELS:
            raise ImageRejected("too_large", f"RLE-compressed BMP of {abs(w)}x{abs(h)} is over {MAX_RLE_BMP_PIXELS} "
                                "pixels (decoded one pixel at a time in Python)")


def jpeg_coefficient_bytes(data: bytes, img: Image.Image) -> int:
    """Bytes libjpeg holds for a multi-scan JPEG's DCT coefficients (2 bytes
    each, every component at its own sampling) before the first pixel comes
    out; 0 for other images. Kept at full resolution whatever the DCT scaling
    of the output, so a 1.5 MB progressive 16384x6100 CMYK file holds 800 MB
    even when decoded at 1/8 scale."""
    layers = getattr(img, "layer", None)
    if img.format not in JPEG_FORMATS or not layers or not _jpeg_multi_scan(data):
        return 0
    w, h = img.size
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    blocks = sum(-(-w * max(hs, 1) // (8 * h_max)) * -(-h * max(vs, 1) // (8 * v_max)) for _, hs, vs, _ in layers)
    return blocks * 64 * 2


# Samples a pixel of each chroma subsampling carries across its planes (luma and
# two chroma; 400 is monochrome).
_PLANE_SAMPLES = {400: 1.0, 420: 1.5, 422: 2.0, 444: 3.0}
_AV1C = b"av1C"
_AV1C_BOXES_READ = 4  # a colour item and its alpha; more would be a crafted file


def _av1_configs(data: bytes) -> list[tuple[int, int]]:
    """(bytes a sample, chroma) of each AV1 item an AVIF declares, read from
    its ``av1C`` boxes (AV1-ISOBMFF 2.3.3: marker/version byte 0x81, then
    profile and level, then the high_bitdepth, twelve_bit, monochrome and
    subsampling bits); empty when none could be read."""
    configs: list[tuple[int, int]] = []
    at = data.find(_AV1C)
    while at >= 0 and len(configs) < _AV1C_BOXES_READ:
        body = data[at + 4:at + 7]
        if len(body) == 3 and body[0] == 0x81:
            bits = body[2]
            high_depth, mono = bits & 0x40, bits & 0x10
            sub_x, sub_y = bits & 0x08, bits & 0x04
            chroma = 400 if mono else 420 if sub_x and sub_y else 422 if sub_x else 444
            configs.append((2 if high_depth else 1, chroma))
        at = data.find(_AV1C, at + 4)
    return configs


def codec_buffer_bytes(data: bytes, img: Image.Image) -> int:
    """Bytes a HEIF or AVIF decoder holds beside Pillow's image: libheif and
    libavif decode into YCbCr planes at the coded bit depth, convert those to
    interleaved RGB(A), and only then fill Pillow's pixels; 0 for other
    formats. Peaks measured over 16 MP files in a fresh process, all held
    bytes a pixel (Pillow's 4 included): 8-bit 4:2:0 HEIF 7.8, AVIF 9.4;
    8-bit 4:4:4 HEIF 9.8, AVIF 11.0; 10-bit 4:4:4 HEIF 15.8; counted: 9.5,
    11, 11, 14, 18. A file whose depth and subsampling cannot be read is
    counted as 16-bit 4:4:4."""
    w, h = img.size
    if img.format == "HEIF":  # pillow-heif reads both from the header
        depth, chroma = img.info.get("bit_depth") or 16, img.info.get("chroma") or 444
        sample = 1 if depth <= 8 else 2
        return int(w * h * sample * (_PLANE_SAMPLES.get(chroma, 3.0) + 4))
    if img.format == "AVIF":  # Pillow's plugin says neither: read from the file
        configs = _av1_configs(data) or [(2, 444)]
        # The AV1 decoder's own frame and the planes libavif copies it into.
        planes = sum(2 * sample * _PLANE_SAMPLES[chroma] for sample, chroma in configs)
        return int(w * h * (planes + 4 * max(sample for sample, _ in configs)))
    return 0


class DecodeBudget:
    """Decoded bytes in flight across this process's analysis threads: a
    burst of large images waits its turn instead of multiplying the peak."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, cost: int, timeout_s: float = 60.0) -> Iterator[None]:
        cost = min(cost, self.capacity)  # callers reject above capacity; never deadlock on rounding
        with self._cond:
            if not self._cond.wait_for(lambda: self._used + cost <= self.capacity, timeout_s):
                raise ImageRejected("busy", f"decode memory budget busy for {timeout_s:.0f}s")
            self._used += cost
        try:
            yield
        finally:
            with self._cond:
                self._used -= cost
                self._cond.notify_all()


_budgets: dict[int, DecodeBudget] = {}
_budgets_lock = threading.Lock()


def process_budget(capacity: int) -> DecodeBudget:
    """One budget per capacity per process (normally exactly one)."""
    with _budgets_lock:
        return _budgets.setdefault(capacity, DecodeBudget(capacity))


_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _text_too_large(ctype: bytes, body: bytes, limit: int) -> bool:
    if ctype == b"tEXt":
        return len(body) > limit
    try:
        if ctype in (b"zTXt", b"iCCP"):  # name\0 method compressed: the same layout
            comp = body.split(b"\0", 1)[1][1:]
        else:  # iTXt: keyword\0 flag method lang\0 tkey\0 text
            keyword, rest = body.split(b"\0", 1)
            if rest[0] == 0:
                return len(rest) > limit
            comp = rest[2:].split(b"\0", 2)[2]
        d = zlib.decompressobj()
        d.decompress(comp, limit + 1)
        return bool(d.unconsumed_tail)
    except (IndexError, zlib.error):
        return False  # malformed, but small: Pillow decides


# Notes said about the chunks skipped from one picture; more are counted in one.
MAX_NOTES = 5

# The tRNS length Pillow requires (it refuses the file below it) by IHDR
# colour type: grey 2 bytes, truecolour 6. Viewers ignore such a chunk.
_TRNS_MIN = {0: 2, 2: 6}


def strip_oversized_png_text(data: bytes, limit: int, *, all_text: bool = False) -> tuple[bytes, list[str]]:
    """``data`` without the PNG metadata chunks Pillow refuses the whole image
    for: text chunks that decompress beyond ``limit``, or every text chunk
    (``all_text``: their sum was over Pillow's total); an ICC profile
    (iCCP) that decompresses beyond ``limit``; a tRNS chunk too short for the
    colour type. Browsers show such a picture (they ignore a profile or a
    transparency they cannot use): refusing it would let padded metadata hide
    the pixels from analysis. Returns the bytes and what was dropped."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data, []
    colour_type = data[25] if len(data) > 25 else -1  # IHDR is the first chunk
    out, notes, pos = [data[:8]], [], 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        body = data[pos + 8:pos + 8 + length]
        if ctype in _TEXT_CHUNKS and (all_text or _text_too_large(ctype, body, limit)):
            notes.append(f"{ctype.decode()} chunk of {length} bytes "
                         f"{'(text chunks together over the limit)' if all_text else f'decompresses beyond {limit} bytes'}; skipped")
        elif ctype == b"iCCP" and _text_too_large(ctype, body, PngImagePlugin.MAX_TEXT_CHUNK):  # Pillow's bound
            notes.append(f"iCCP (ICC profile) chunk of {length} bytes decompresses beyond "
                         f"{PngImagePlugin.MAX_TEXT_CHUNK} bytes; skipped")
        elif ctype == b"tRNS" and length < _TRNS_MIN.get(colour_type, 0):
            notes.append(f"tRNS chunk of {length} bytes is too short for colour type {colour_type}; skipped")
        else:
            out.append(data[pos:end])
        pos = end
    out.append(data[pos:])
    return b"".join(out), notes


def _eight_bit(img: Image.Image) -> Image.Image:
    """``img`` with 16-bit or 32-bit integer pixels scaled into 0-255, and
    float pixels in 0-1 scaled to it. Pillow converts those modes to 8 bits by
    clipping: a 16-bit grey PNG at half grey decoded white (its JPEG repost,
    grey, was 24 pHash bits away), a float TIFF in 0-1 black. ``I`` holds
    16-bit PNG and TIFF samples as well as 8-bit ones, so it is scaled only
    when a sample is above 255."""
    if img.mode.startswith("I;16"):
        return img.convert("I").point(lambda v: v / 257)
    if img.mode in ("I", "F"):
        low, high = img.getextrema()
        if img.mode == "I" and high > 255:
            return img.point(lambda v: v / 257)
        if img.mode == "F" and 0 <= low and high <= 1:
            return img.point(lambda v: v * 255)
    return img


# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def upright(img: Image.Image) -> None:
    """``img`` (loaded) turned upright by its EXIF orientation, in place, as
    ``ImageOps.exif_transpose(img, in_place=True)`` turns it, without what
    that also does: write the EXIF block back without its orientation. That
    write raised for many a malformed tag that reading had let through (a
    RATIONAL where text belongs, an offset past the block), and the picture,
    which browsers show upright, was refused as undecodable: one bad tag
    beside an orientation hid a picture from analysis. The pixels are all a
    decode gives; its metadata is read from ``header``."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: as stored (``ImageData.orientation`` says 1 too)
        return
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return
    turned = img.transpose(method)
    img.im = turned.im
    img._size = turned.size


def ignore_pillow_warnings() -> None:
    """Silence Pillow's warnings for the whole process: each program that
    decodes calls this once at start.

    They are about one input (a corrupt EXIF block, an image over Pillow's own
    pixel limit, a palette's transparency), and that input's result already
    says what matters: a rejection, a note, a score. Not ``catch_warnings``
    around each decode: it swaps the process's one filter list, so where
    threads decode at once a thread leaving its block restores the list
    another thread's block relied on (that thread's warning is printed), or
    leaves the other block's "ignore" in place for good."""
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


class _cached:
    """``functools.cached_property`` as Python 3.12 has it. In 3.11 it holds
    one lock per class, not per instance: every image's decode in the process
    waited for every other's, and the event loop's inline analysis of a small
    picture for a thread decoding a large one. Two threads asking one image at
    once may both compute; the value is the same."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


def _open_image(data: bytes) -> Image.Image:
    """Pillow's lazy open of ``data``, among the accepted formats only."""
    return Image.open(io.BytesIO(data), formats=open_formats())


class ImageData:
    """Undecoded image bytes plus lazily decoded views of them."""

    def __init__(self, data: bytes, *, path: str | None = None, limits: DecodeLimits | None = None,
                 sha256: str | None = None):
        """``sha256``: the digest of ``data`` if the caller already took it."""
        self.data = data
        if sha256 is not None:
            self.__dict__["sha256"] = sha256  # the cached value's slot
        self.path = path
        self.limits = limits or DecodeLimits()
        if len(data) == 0:
            raise ImageRejected("empty", "image is empty (0 bytes)")
        if len(data) > self.limits.max_bytes:
            raise ImageRejected("too_large", f"image is {len(data)} bytes, limit {self.limits.max_bytes}")
        # What decoding could not use, said out loud (e.g. an oversized metadata
        # chunk skipped so the pixels are still analysed): callers report it.
        self.notes: list[str] = []
        self._decodable = data
        check_jpeg_scans(data, self.limits.max_jpeg_scans)
        check_structure(data)
        header = self.open()  # validates format, dimensions and cost without decoding pixels
        self.header = header
        self.format: str = (header.format or "UNKNOWN").upper()
        self.size: tuple[int, int] = header.size
        # A multi-scan JPEG's coefficients are held in full while it decodes,
        # whatever the output scale: part of its cost, never reduced.
        self._coefficients = jpeg_coefficient_bytes(data, header)
        self.decode_cost = decode_cost(header) + self._coefficients + codec_buffer_bytes(data, header)
        self._reduce = 1  # JPEG DCT scale used when the full decode is over budget
        if self.decode_cost > self.limits.max_decode_bytes:
            self._fit_budget(header)

    @classmethod
    def from_path(cls, path: str | Path, limits: DecodeLimits | None = None) -> "ImageData":
        """The image in the file at ``path``. Reads only a regular file of at
        most ``max_bytes``, told from its size: a multi-gigabyte file is
        refused as ``too_large`` without being read. Anything that is not a
        regular file (a FIFO, which a plain open would wait on forever, a
        device such as /dev/zero, a socket, a directory) raises
        ``FileRefused``, an ``OSError`` whose ``reason`` says which."""
        limits = limits or DecodeLimits()
        try:
            data = read_regular(path, limits.max_bytes)
        except FileRefused as e:
            if e.reason == "too_large":
                raise ImageRejected("too_large", f"image is over {limits.max_bytes} bytes, the limit") from None
            raise
        return cls(data, path=str(path), limits=limits)

    @_cached
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def _fit_budget(self, header: Image.Image) -> None:
        budget = self.limits.max_decode_bytes
        full = self.decode_cost - self._coefficients  # the output, which DCT scaling shrinks
        if header.format in JPEG_FORMATS:
            for scale in (2, 4, 8):
                if full // (scale * scale) + self._coefficients <= budget:
                    self._reduce = scale
                    self.decode_cost = full // (scale * scale) + self._coefficients
                    self.notes.append(f"decoded at 1/{scale} scale: full size would need "
                                      f"{full >> 20} MiB, budget {budget >> 20} MiB")
                    return
        w, h = header.size
        held = f" (+{self._coefficients >> 20} MiB of DCT coefficients)" if self._coefficients else ""
        raise ImageRejected(
            "memory_budget",
            f"{w}x{h} {header.mode} needs {full >> 20} MiB decoded{held}, budget {budget >> 20} MiB "
            "(decode.max_decode_mb)")

    # ``header`` (set in __init__): the PIL image the checks above opened, for
    # reading metadata (info, EXIF, quantization tables) without parsing the
    # file again -- most of a small JPEG's cost before its pixels. Never draft,
    # crop or convert it: decoding starts from a fresh ``open()``.
    header: Image.Image

    def open(self) -> Image.Image:
        """A fresh, not-yet-decoded PIL image (decoding starts from one; for
        metadata alone, ``header`` is already open)."""
        try:
            try:
                img = _open_image(self._decodable)
            except ValueError:
                if not self._strip_png_text():
                    raise
                img = _open_image(self._decodable)
        except Image.DecompressionBombError as e:
            # Pillow refuses at open, past twice its own limit whatever
            # decode.max_pixels says, before the size check below
            pixels = re.search(r"\((\d+) pixels\)", str(e))
            raise ImageRejected("decompression_bomb", f"{pixels.group(1) if pixels else 'more'} pixels exceeds "
                                                      f"Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS}") from e
        except Image.UnidentifiedImageError as e:
            raise ImageRejected("undecodable", "not a decodable image (unknown or corrupt format; accepted: "
                                f"{', '.join(ACCEPTED_FORMATS)})") from e
        except Exception as e:  # PIL raises many types for garbage input
            raise ImageRejected("undecodable", f"not a decodable image: {e}") from e
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageRejected("empty", f"image has no pixels ({w}x{h})")
        if max(w, h) > self.limits.max_dimension:
            raise ImageRejected("too_large", f"{w}x{h} exceeds max dimension {self.limits.max_dimension}")
        if w * h > self.limits.max_pixels:
            raise ImageRejected(
                "decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds limit {self.limits.max_pixels}"
            )
        return img

    def _strip_png_text(self) -> bool:
        """Whether the PNG metadata chunks Pillow refuses were dropped from what
        is decoded (``notes`` says which): padded metadata must not hide the
        pixels from analysis. The oversized text chunk(s), or all text if only
        their sum was over Pillow's total, an oversized ICC profile, a short
        tRNS (``strip_oversized_png_text``); False when nothing was or it is
        not a PNG."""
        if self._decodable is not self.data or not self.data.startswith(b"\x89PNG"):
            return False
        for limit, all_text in ((PngImagePlugin.MAX_TEXT_CHUNK, False), (0, True)):
            stripped, notes = strip_oversized_png_text(self.data, limit, all_text=all_text)
            if notes:
                self._decodable = stripped
                if len(notes) > MAX_NOTES:
                    # Each note is an evidence item of the sighting: 30,000 tiny text
                    # chunks beside 70 MB of inflating ones (a 645 KB file) made a
                    # 7 MB cluster op, and the picture a dead letter (too_large).
                    notes = notes[:MAX_NOTES - 1] + [f"{len(notes) - MAX_NOTES + 1} more metadata chunks skipped"]
                self.notes.extend(notes)
                return True
        return False

    def _decode(self, img: Image.Image, mode: str = "RGB", *, oriented: bool = True) -> Image.Image:
        if self._reduce > 1 and img.format in JPEG_FORMATS and img.size == self.size:
            w, h = img.size
            img.draft(img.mode, (w // self._reduce, h // self._reduce))
        try:
            try:
                img.load()
            except ValueError:
                # Text chunks after the pixels are read by load(), not open()
                if img.format != "PNG" or not self._strip_png_text():
                    raise
                img = self.open()
                img.load()
            # In place and no same-mode convert: each copy of a full-size
            # decode is as large as the decode itself, and none of them is
            # in the budget (``decode_cost`` counts one image).
            if oriented:
                upright(img)
            if img.mode != mode:
                return _eight_bit(img).convert(mode)
            # The pixels without the file object: a decoder can hold a
            # buffer as large as the image (WebP keeps its canvas and the
            # frame it returned) for as long as the file object lives.
            return img._new(img.im)
        except Exception as e:
            raise ImageRejected("undecodable", f"image data is truncated or corrupt: {e}") from e

    def pixels(self, mode: str = "RGB", *, oriented: bool = True) -> Image.Image:
        """Full-resolution pixels in ``mode``. ``oriented=False`` keeps the
        stored pixel grid (what a watermark or LSB payload was written into);
        an image without EXIF rotation reuses the cached ``rgb`` decode."""
        if mode == "RGB" and (oriented or self.orientation == 1):
            return self.rgb
        return self._decode(self.open(), mode, oriented=oriented)

    @_cached
    def orientation(self) -> int:
        try:
            return int(self._exif().get(0x0112, 1) or 1)
        except Exception:  # unreadable EXIF: treat as unrotated
            return 1

    def _exif(self) -> Image.Exif:
        if self.format != "PNG":
            return self.header.getexif()
        # Pillow's PNG getexif() decodes every pixel, looking for an eXIf chunk
        # after the image data, and keeps them in ``header``: a full-size copy
        # outside the decode budget (measured: +176 MiB for a 6800x6800 RGB
        # PNG). The chunk list says the same without decoding.
        from detectors.plugins._png_text import iter_png_chunks

        exif = Image.Exif()
        for ctype, body in iter_png_chunks(self.data):
            if ctype == b"eXIf":
                exif.load(bytes(body))
                break
        return exif

    @_cached
    def rgb(self) -> Image.Image:
        """Full-resolution RGB, EXIF orientation applied."""
        return self._decode(self.open())

    def drop_decoded(self) -> None:
        """Forget the decoded views (``rgb``, thumbnails): their memory goes
        back once nothing else holds them, and a later use decodes again."""
        self.__dict__.pop("rgb", None)
        self.__dict__.pop("_thumbs", None)

    def thumbnail_cost(self, min_side: int) -> int:
        """Bytes ``thumbnail(min_side)`` holds at its peak: a JPEG's decode at
        the DCT scale draft mode picks (1/2..1/8), else ``decode_cost``."""
        if self.format not in JPEG_FORMATS or self._reduce != 1:
            return self.decode_cost
        scale = max(1, min(self.size) // min_side)
        r = 1
        while r < 8 and r * 2 <= scale:
            r *= 2
        return (self.decode_cost - self._coefficients) // (r * r) + self._coefficients

    def thumbnail(self, min_side: int = 128) -> Image.Image:
        """A small RGB view, at least ``min_side`` on its short side where the
        source allows. JPEG draft mode decodes at 1/2..1/8 scale directly from
        the DCT coefficients, which is most of the hashing speed-up."""
        cached = self._thumbs.get(min_side)
        if cached is not None:
            return cached
        img = self.open()
        out = None
        if img.format in JPEG_FORMATS:
            w, h = img.size
            scale = max(1, min(w, h) // min_side)
            if scale > 1:
                img.draft("RGB", (w // scale, h // scale))
                out = self._decode(img)
        if out is None:
            # No reduced decode exists for this source: the full one is
            # ``rgb``, shared rather than decoded (and held) a second time.
            out = self.rgb
        self._thumbs[min_side] = out
        return out

    @_cached
    def _thumbs(self) -> dict[int, Image.Image]:
        return {}
