"""A1111 "stealth pnginfo": generation parameters hidden in pixel LSBs.

The stealth-pnginfo extension (and its ComfyUI/Forge ports) survives
metadata stripping by writing the parameters into the least significant bit
of the alpha channel (``stealth_pnginfo``, or gzip'd ``stealth_pngcomp``) or of
R, G, B (``stealth_rgbinfo`` / ``stealth_rgbcomp``). Bits run column-major
(x outer, y inner), MSB first: a 15-byte signature, a 32-bit payload length
in bits, then the payload. A 120-bit signature cannot occur by chance, so a
match is decisive. Only lossless formats can carry it.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from detectors.base import Detector, Evidence, EvidenceKind, register
from detectors.imagedata import ImageData, _eight_bit
from detectors.plugins._sd_formats import recognise

_SIGNATURES = {
    "alpha": {b"stealth_pnginfo": False, b"stealth_pngcomp": True},
    "rgb": {b"stealth_rgbinfo": False, b"stealth_rgbcomp": True},
}
_SIG_BITS = 15 * 8
_LEN_BITS = 32
MAX_PAYLOAD_BYTES = 1 << 20  # parameters are a few KiB; never unpack more than this
_LOSSLESS_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})


def _per_pixel(mode: str) -> int:
    return 1 if mode == "alpha" else 3


def _lsb_stream(img: Image.Image, mode: str, n_bits: int) -> np.ndarray:
    """The first ``n_bits`` LSBs in the extension's order, from the alpha
    channel (``mode`` "alpha", an RGBA ``img``) or R, G, B ("rgb"). Bits run
    column-major, so only the first columns are read: as an array, the whole
    picture would be another full-size copy outside the decode budget."""
    w, h = img.size
    cols = min(w, -(-n_bits // (h * _per_pixel(mode))))
    crop = img.crop((0, 0, cols, h))
    if crop.mode not in ("RGBA", "RGB") or (mode == "alpha" and crop.mode != "RGBA"):
        # ``img`` in its stored mode (a palette, grey, with a transparency):
        # only the columns read become RGBA, never the whole picture.
        alphas = crop.info.get("transparency")
        if crop.mode == "P" and isinstance(alphas, bytes):
            # One alpha per palette entry: a longer tRNS chunk (viewers ignore
            # the rest) made the conversion raise, and the detector with it.
            crop.info["transparency"] = alphas[:len(crop.getpalette() or ()) // 3]
        crop = _eight_bit(crop).convert("RGBA")
    part = np.asarray(crop)
    part = part[..., 3] if mode == "alpha" else part[..., :3]
    part = part.T if part.ndim == 2 else part.transpose(1, 0, 2)
    return (part.reshape(-1)[:n_bits] & 1).astype(np.uint8)


def _gunzip(data: bytes) -> bytes | None:
    d = zlib.decompressobj(wbits=31)
    try:
        return d.decompress(data, MAX_PAYLOAD_BYTES)
    except zlib.error:
        return None


def read_stealth(img: Image.Image, mode: str) -> tuple[str, str] | None:
    """(signature, text) when the ``mode`` ("alpha" or "rgb") channels of
    ``img`` carry stealth metadata, else None."""
    capacity = img.size[0] * img.size[1] * _per_pixel(mode)
    if capacity < _SIG_BITS + _LEN_BITS:
        return None
    header = _lsb_stream(img, mode, _SIG_BITS + _LEN_BITS)
    signature = np.packbits(header[:_SIG_BITS]).tobytes()
    compressed = _SIGNATURES[mode].get(signature)
    if compressed is None:
        return None
    n_bits = int("".join(map(str, header[_SIG_BITS:])), 2)
    if n_bits <= 0 or n_bits % 8 or n_bits > min(capacity - _SIG_BITS - _LEN_BITS, MAX_PAYLOAD_BYTES * 8):
        return signature.decode(), ""  # the signature alone is the evidence
    payload = np.packbits(_lsb_stream(img, mode, _SIG_BITS + _LEN_BITS + n_bits)[_SIG_BITS + _LEN_BITS :]).tobytes()
    raw = _gunzip(payload) if compressed else payload
    return signature.decode(), (raw or b"").decode("utf-8", errors="replace")


@register
class StealthPngInfoDetector(Detector):
    name = "stealth-pnginfo"
    kind = EvidenceKind.METADATA
    cost = "cheap"

    def analyze(self, image: ImageData) -> list[Evidence]:
        if image.format not in _LOSSLESS_FORMATS:
            return []
        # The payload is written into the stored pixel grid: read it unrotated,
        # alpha and RGB from one decode.
        header = image.header
        if "A" in header.getbands() or "transparency" in header.info:
            # In the stored mode, not converted whole: an RGBA copy of a palette
            # picture was 4 bytes a pixel beside the cached RGB decode, outside
            # the decode budget (a 16384x4000 palette PNG with a transparency,
            # counted at 312 MiB, peaked 250 MB above an RGB one of its cost).
            stored = image.pixels(header.mode, oriented=False)
            found = read_stealth(stored, "alpha") or read_stealth(stored, "rgb")
        else:
            found = read_stealth(image.pixels(oriented=False), "rgb")
        if found is None:
            return []
        signature, text = found
        channel = "alpha channel" if "png" in signature else "RGB channels"
        finding = recognise("parameters", text, "stealth") if text else None
        detail = f"AUTOMATIC1111 stealth metadata hidden in the {channel} LSBs ({signature})"
        if finding is not None and finding.model:
            detail += f"; model {finding.model}"
        data = {"signature": signature, "parameters": text[:2000], "generator": finding.generator if finding else None}
        return [Evidence(detector=self.name, kind=self.kind, score=0.99, weight=3.0, detail=detail, data=data)]
