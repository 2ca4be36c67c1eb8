"""Perceptual hashes of an image: pHash (64 bit) and PDQ (256 bit, with its
quality score), plus the same hashes of the mirrored image so a horizontally
flipped repost can be found by querying with both.

Speed: decoding is the floor, so everything is computed from *one* JPEG
draft-mode thumbnail (``ImageData.thumbnail``, >= 128 px short side, decoded
at 1/2..1/8 scale straight from the DCT coefficients). The mirrored hashes are
nearly free:

* pHash: mirroring the 32x32 input reverses its columns, which flips the sign
  of every odd-column DCT coefficient and leaves the rest alone, so the mirror
  hash is the same 8x8 block with signs flipped and its own median: no second
  resize or DCT.
* PDQ: ``pdqhash.compute_dihedral`` returns all eight dihedral variants from
  one DCT for the price of one ``compute``; index 5 is the horizontal mirror.
  It flips PDQ's 64x64 downsampled buffer, and PDQ's box filter is not quite
  mirror-symmetric, so it is within a few bits of PDQ-of-the-flipped-pixels
  (0 on most photos, up to ~30 on synthetic high-frequency patterns), not
  bit-exact; the mirror recall in ``bench/neardup.py`` measures the effect.

The pHash is bit-compatible with ``imagehash.phash`` (grey, 32x32 Lanczos,
type-II DCT, 8x8 low frequencies > their median, same bit order), checked in
tests, so hashes exchanged with other tools stay comparable.
"""

from __future__ import annotations

import numpy as np
import pdqhash
from PIL import Image
from pydantic import BaseModel, ConfigDict

from detectors.imagedata import ImageData

_PDQ_MIRROR = 5  # position of the horizontal flip in pdqhash.compute_dihedral's output
_HASH_SIDE = 32
_LOW = 8
_THUMB_SIDE = 128


def _dct_rows(n: int, k: int) -> np.ndarray:
    """First ``k`` rows of the unnormalised type-II DCT matrix (scipy's default
    scaling up to a positive constant, which does not change which side of the
    median a coefficient falls)."""
    x = np.arange(n)
    return np.cos(np.pi * np.arange(k)[:, None] * (2 * x[None, :] + 1) / (2 * n))


_D = _dct_rows(_HASH_SIDE, _LOW)
_ODD_COLS = np.where(np.arange(_LOW) % 2 == 1, -1.0, 1.0)[None, :]


class ImageHashes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phash: str  # 64-bit, 16 hex chars
    pdq: str  # 256-bit, 64 hex chars
    pdq_quality: int
    phash_mirror: str | None = None
    pdq_mirror: str | None = None


def _bits_hex(bits: np.ndarray) -> str:
    return np.packbits(np.asarray(bits, dtype=np.uint8).reshape(-1)).tobytes().hex()


def phash_pair(image: Image.Image) -> tuple[str, str]:
    """(pHash, pHash of the mirror image) from one resize and one DCT."""
    pixels = np.asarray(image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _D @ pixels @ _D.T
    mirrored = low * _ODD_COLS
    return _bits_hex(low > np.median(low)), _bits_hex(mirrored > np.median(mirrored))


def pdq_pair(image: Image.Image) -> tuple[str, str, int]:
    """(PDQ, PDQ of the mirror image, quality) from one pdqhash call."""
    hashes, quality = pdqhash.compute_dihedral(np.asarray(image))
    return _bits_hex(hashes[0]), _bits_hex(hashes[_PDQ_MIRROR]), int(quality)


def hashes_of(image: Image.Image) -> ImageHashes:
    """Hashes of an already decoded RGB image (e.g. a thumbnail)."""
    phash, phash_m = phash_pair(image)
    pdq, pdq_m, quality = pdq_pair(image)
    return ImageHashes(phash=phash, pdq=pdq, pdq_quality=quality, phash_mirror=phash_m, pdq_mirror=pdq_m)


def compute_hashes(image: ImageData) -> ImageHashes:
    return hashes_of(_small(image.thumbnail(_THUMB_SIDE)))


def _small(image: Image.Image) -> Image.Image:
    """Non-JPEG sources get no draft decode and arrive full size; a box
    ``reduce`` to >= 128 px keeps resize/PDQ cost flat (hashes move 0-2 bits)."""
    factor = min(image.size) // _THUMB_SIDE
    return image.reduce(factor) if factor >= 2 else image


def hamming_hex(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()
