"""Stable Diffusion's invisible watermark (invisible-watermark, ``dwtDct``).

The reference txt2img scripts embed ``b"StableDiffusionV1"`` (SD 1.x, CompVis)
or ``b"SDV2"`` (SD 2.x, Stability-AI/stablediffusion), and SDXL pipelines a
fixed 48-bit message. The encoder works on the U channel of OpenCV's YUV: a
one-level Haar DWT, 4x4 blocks of the LL band in row-major order, block ``n``
carrying message bit ``n % len(message)``; the decoder averages each bit over
all its blocks.

Because bit positions only depend on the block index, we decode a band of
full-width rows at the top of the image: the same blocks, with the same
indices, as in the full-image decode, so the result is what the reference
decoder would compute on those blocks, in time bounded by ``MAX_BLOCKS``
instead of by image size. The math is vectorised (the reference loops over
blocks in Python). Both channel orders are tried, since some SDXL pipelines
handed RGB arrays to the BGR-expecting encoder.

A match is evidence; no match is *no evidence*: recompression and resizing
erase the mark.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pywt
from PIL import Image, JpegImagePlugin

from detectors.base import Detector, Evidence, EvidenceKind, register
from detectors.imagedata import JPEG_FORMATS, ImageData

SCALE = 36.0  # imwatermark's default dwtDct scale for the U channel
BLOCK = 4
MIN_PIXELS = 256 * 256  # the encoder refuses smaller images, so nothing to find
# ~= a full 2048x2048 decode: >= 480 blocks per bit of the longest mark. About
# 17% of blocks decode wrong even on a pristine marked image (the encoder
# rounds to uint8), so the per-bit average needs dozens of blocks to be reliable.
MAX_BLOCKS = 1 << 16


def _bits(message: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(message, dtype=np.uint8))


SDXL_MESSAGE = 0b101100111110110010010000011110111011000110011110


@dataclass(frozen=True)
class Mark:
    name: str
    generator: str
    bits: np.ndarray
    max_errors: int  # bit errors tolerated; chance match at random < 1e-8 for each


MARKS: tuple[Mark, ...] = (
    Mark("StableDiffusionV1", "Stable Diffusion 1.x", _bits(b"StableDiffusionV1"), 4),
    Mark("SDV2", "Stable Diffusion 2.x", _bits(b"SDV2"), 0),
    Mark("SDXL", "Stable Diffusion XL", np.array([int(b) for b in bin(SDXL_MESSAGE)[2:]], dtype=np.uint8), 1),
)


def block_bits(bgr: np.ndarray, full_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block embedded bit and its block index, for a band of full-width rows
    starting at the image top (``bgr`` is that band, uint8)."""
    rows = bgr.shape[0] // 4 * 4
    cols = full_width // 4 * 4
    u = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2YUV)[:rows, :cols, 1]
    ll, _ = pywt.dwt2(u, "haar")
    nbr, nbc = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    blocks = ll[: nbr * BLOCK, : nbc * BLOCK].reshape(nbr, BLOCK, nbc, BLOCK).transpose(0, 2, 1, 3)
    flat = blocks.reshape(nbr, nbc, BLOCK * BLOCK)[:, :, 1:]  # the DC coefficient is never used
    pos = np.abs(flat).argmax(axis=2)
    val = np.abs(np.take_along_axis(flat, pos[..., None], axis=2)[..., 0])
    bits = (np.mod(val, SCALE) > 0.5 * SCALE).astype(np.uint8).ravel()
    return bits, np.arange(bits.size)


def decode(bits: np.ndarray, index: np.ndarray, length: int) -> np.ndarray:
    """Average each message bit over its blocks, threshold like imwatermark."""
    slot = index % length
    ones = np.bincount(slot, weights=bits, minlength=length)
    counts = np.bincount(slot, minlength=length)
    avg = ones / np.maximum(counts, 1)
    return (avg * 255 > 127).astype(np.uint8)


def band_rows(w: int, h: int) -> int:
    """Rows of the top band: a multiple of 8 pixels (whole LL blocks),
    holding at most ``MAX_BLOCKS`` blocks."""
    blocks_per_row = max(1, (w // 4 * 4 // 2) // BLOCK)
    block_rows = max(1, MAX_BLOCKS // blocks_per_row)
    return min(h, block_rows * 2 * BLOCK)


def top_band(rgb: np.ndarray) -> np.ndarray:
    """Full-width rows from the top (``band_rows``)."""
    h, w = rgb.shape[:2]
    return rgb[: band_rows(w, h)]


def detect_marks(rgb: np.ndarray | Image.Image, *, size: tuple[int, int] | None = None) -> list[dict[str, object]]:
    """Every known mark found in a picture's stored pixel grid: an RGB uint8
    array, or an RGB image, of which only the top band (``band_rows``)
    becomes an array (the whole picture as one would be one more full-size
    copy, outside the decode budget). ``size``: the picture's own (width,
    height) where ``rgb`` is a reduced-scale decode of it (``ImageData``):
    a picture smaller than ``MIN_PIXELS`` carries no mark to find. The band
    is cut from what was decoded, at its own width. The plugin's one path
    (``InvisibleWatermarkDetector.analyze``)."""
    if isinstance(rgb, np.ndarray):
        h, w = rgb.shape[:2]
    else:
        w, h = rgb.size
    full_w, full_h = size or (w, h)
    if full_w * full_h < MIN_PIXELS:
        return []
    if isinstance(rgb, np.ndarray):
        return marks_in_band(top_band(rgb))
    rows = band_rows(w, h)
    return marks_in_band(np.asarray(rgb.crop((0, 0, w, rows)) if rows < h else rgb))


def marks_in_band(band: np.ndarray) -> list[dict[str, object]]:
    """Every known mark found in the top band (``band_rows``) of a picture."""
    w = band.shape[1]
    found = []
    for order, bgr in (("bgr", band[:, :, ::-1]), ("rgb", band)):
        bits, index = block_bits(bgr, w)
        for mark in MARKS:
            decoded = decode(bits, index, mark.bits.size)
            errors = int(np.count_nonzero(decoded != mark.bits))
            if errors <= mark.max_errors:
                found.append({"mark": mark.name, "generator": mark.generator, "bit_errors": errors,
                              "bits": int(mark.bits.size), "channel_order": order})
    return found


def jpeg_erased_mark(img: Image.Image) -> bool:
    """True when a JPEG's chroma quantisation is coarse enough to have erased
    any dwtDct mark, so the full-resolution decode can be skipped. Measured by
    round-tripping marked images: with chroma subsampling the mark is gone by
    quality ~90 (mean chroma quantiser ~17), at 4:4:4 it survives to ~80 (~35).
    The cut-offs leave a margin on the side of decoding."""
    if img.format not in JPEG_FORMATS:  # an MPO is a JPEG too
        return False
    tables = getattr(img, "quantization", None) or {}
    chroma = tables.get(1)
    if chroma is None:
        return False
    mean_q = float(np.mean(chroma))
    subsampled = JpegImagePlugin.get_sampling(img) in (1, 2)
    return mean_q > (15.0 if subsampled else 45.0)


@register
class InvisibleWatermarkDetector(Detector):
    name = "invisible-watermark"
    kind = EvidenceKind.WATERMARK
    cost = "cheap"

    def analyze(self, image: ImageData) -> list[Evidence]:
        if jpeg_erased_mark(image.header):
            return []
        # The mark lives in the stored pixel grid, which an EXIF rotation would move. A large JPEG
        # is decoded at a reduced scale (``ImageData``): its band is of those pixels. Too small a
        # picture is left there (``MIN_PIXELS``), on its own size: decoding one costs little.
        found = detect_marks(image.pixels(oriented=False), size=image.size)
        if not found:
            return []
        best = min(found, key=lambda f: f["bit_errors"])
        detail = (f"{best['generator']} invisible watermark ({best['mark']}, dwtDct) decoded with "
                  f"{best['bit_errors']}/{best['bits']} bit errors")
        return [Evidence(detector=self.name, kind=self.kind, score=0.97, weight=2.5, detail=detail, data={"marks": found})]
