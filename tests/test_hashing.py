from __future__ import annotations

import io

import imagehash
import numpy as np
import pdqhash
from PIL import Image, ImageOps

from detectors.hashing import ImageHashes, compute_hashes, hamming_hex, hashes_of, phash_pair
from detectors.imagedata import ImageData


def _picture(seed: int, size=(480, 360)) -> Image.Image:
    """A smooth, detailed synthetic picture: different seeds look different."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for _ in range(12):
        fx, fy, ph = rng.uniform(0.5, 12, 2).tolist() + [rng.uniform(0, 6.3)]
        img += rng.uniform(-1, 1, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + ph)[..., None]
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8))


def _jpeg(img: Image.Image, q: int = 90) -> ImageData:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return ImageData(buf.getvalue())


def test_shapes_and_types():
    h = compute_hashes(_jpeg(_picture(1)))
    assert isinstance(h, ImageHashes)
    assert len(h.phash) == 16 and len(h.pdq) == 64
    assert len(h.phash_mirror) == 16 and len(h.pdq_mirror) == 64
    assert 0 <= h.pdq_quality <= 100


def test_phash_is_bit_compatible_with_imagehash_including_mirror():
    for seed in range(5):
        img = _picture(seed, (200, 150))
        p, pm = phash_pair(img)
        assert p == str(imagehash.phash(img))
        assert pm == str(imagehash.phash(ImageOps.mirror(img)))


def test_pdq_mirror_is_close_to_pdq_of_flipped_image():
    # compute_dihedral flips the 64x64 downsampled buffer, and PDQ's Jarosz
    # box filter is not mirror-symmetric at the edges: close, not bit-exact
    img = _picture(7, (256, 192))
    h = hashes_of(img)
    bits, _ = pdqhash.compute(np.asarray(ImageOps.mirror(img)))
    assert hamming_hex(h.pdq_mirror, np.packbits(bits.astype(np.uint8)).tobytes().hex()) <= 40
    assert hamming_hex(h.pdq, h.pdq_mirror) > 90


def test_mirror_of_mirror_is_original():
    img = _picture(3)
    a, b = compute_hashes(_jpeg(img)), compute_hashes(_jpeg(ImageOps.mirror(img)))
    assert hamming_hex(a.phash, b.phash_mirror) <= 4
    assert hamming_hex(a.pdq, b.pdq_mirror) <= 16


def test_recompression_is_close_and_different_pictures_far():
    a = compute_hashes(_jpeg(_picture(1), 95))
    b = compute_hashes(_jpeg(_picture(1).resize((240, 180)), 50))
    c = compute_hashes(_jpeg(_picture(2), 95))
    assert hamming_hex(a.phash, b.phash) <= 6
    assert hamming_hex(a.phash, c.phash) > 16


def test_large_png_is_reduced_before_hashing():
    img = _picture(4, (1600, 1200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    h = compute_hashes(ImageData(buf.getvalue()))
    assert hamming_hex(h.phash, str(imagehash.phash(img))) <= 4


def test_hamming_hex():
    assert hamming_hex("00ff", "0f0f") == 8
    assert hamming_hex("ab" * 8, "ab" * 8) == 0
