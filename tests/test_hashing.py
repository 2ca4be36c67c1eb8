from __future__ import annotations

import io

import imagehash
import numpy as np
import pdqhash
from PIL import Image, ImageOps

from bench.neardup_transforms import screenshot
from detectors.hashing import SIDE_BANDS, VIEW_BOXES, ImageHashes, compute_hashes, hamming_hex, hashes_of, phash_pair
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


def test_full_box_view_matches_pil_phash():
    # views resample with PIL's Lanczos weights in one matrix product: the
    # whole-image "view" is the pHash itself, up to PIL's uint8 rounding
    from detectors.hashing import view_phash

    for seed in range(4):
        img = _picture(seed, (256, 192))
        grey = np.asarray(img.convert("L"), dtype=np.float64)
        assert hamming_hex(view_phash(grey, (0, 0, 256, 192)), phash_pair(img)[0]) <= 2


def test_views_present_and_old_records_still_parse():
    h = compute_hashes(_jpeg(_picture(1)))
    # 90% and 80% centre crops, then the off-centre views, then the side bands (v7)
    assert h.views is not None and len(h.views) == 2 + len(VIEW_BOXES) + len(SIDE_BANDS) and not h.trimmed
    assert all(len(v) == 16 for v in h.views)
    old = ImageHashes.model_validate({"phash": h.phash, "pdq": h.pdq, "pdq_quality": h.pdq_quality})
    assert old.views is None and old.trimmed is False
    assert ImageHashes.model_validate_json(h.model_dump_json()) == h


def test_crop_view_is_close_to_hash_of_the_crop():
    img = _picture(2, (480, 360))
    h = compute_hashes(_jpeg(img))
    crop90 = compute_hashes(_jpeg(img.crop((24, 18, 456, 342))))
    crop80 = compute_hashes(_jpeg(img.crop((48, 36, 432, 324))))
    assert hamming_hex(crop90.phash, h.views[0]) <= 4
    assert hamming_hex(crop80.phash, h.views[1]) <= 4


def test_screenshot_border_is_trimmed():
    from detectors.hashing import _small, content_box

    img = _picture(5, (480, 360))
    framed = _jpeg(screenshot(img))
    grey = np.asarray(_small(framed.thumbnail(128)).convert("L"), dtype=np.float64)
    # the picture sits at (24, 45)-(504, 405) of 528 x 465; the thumbnail is half size
    assert grey.shape == (233, 264)
    x0, y0, x1, y1 = content_box(grey)
    assert abs(x0 - 12) <= 1 and abs(y0 - 22.5) <= 1 and abs(x1 - 252) <= 1 and abs(y1 - 202.5) <= 1
    for seed in (1, 3, 4):  # synthetic sinusoids are touchier than photos (bench: median 2 bits)
        img = _picture(seed, (480, 360))
        h = compute_hashes(_jpeg(img))
        s = compute_hashes(_jpeg(screenshot(img)))
        assert s.trimmed and not h.trimmed
        assert hamming_hex(s.phash, h.phash) > 12  # the frame moves the full-frame hash far away
        assert hamming_hex(s.views[0], h.phash) <= 6  # the trimmed view is the picture again
    # letterboxing: black bars on both sides
    boxed = Image.new("RGB", (640, 360))
    boxed.paste(img, (80, 0))
    assert content_box(np.asarray(boxed.convert("L"), dtype=np.float64)) == (80, 0, 560, 360)
    assert content_box(np.asarray(img.convert("L"), dtype=np.float64)) is None
    flat = np.full((120, 160), 200.0)
    assert content_box(flat) is None  # nothing but border: no content to trim to


def test_pdq_pair_is_bit_identical_to_compute_dihedral():
    from detectors.hashing import pdq_pair

    for seed in range(6):
        img = _picture(seed, (256, 192))
        hashes, quality = pdqhash.compute_dihedral(np.asarray(img))
        bits = lambda b: np.packbits(b.astype(np.uint8)).tobytes().hex()  # noqa: E731
        assert pdq_pair(img) == (bits(hashes[0]), bits(hashes[5]), int(quality))


def test_screenshot_caption_reaching_the_bottom_edge_is_trimmed():
    """A small picture's screenshot: the caption line under it runs into the
    bottom edge, so no outer row is flat; the flat strip between the caption
    and the picture still marks where the bar ends (HASHES_VERSION 5)."""
    from detectors.hashing import _small, content_box

    for seed in (1, 2, 4, 6):
        img = _picture(seed, (116, 116))
        shot = screenshot(img)  # pad 5, top bar 14, caption bar 19 px with text in it
        grey = np.asarray(_small(_jpeg(shot).thumbnail(128)).convert("L"), dtype=np.float64)
        assert (np.abs(grey[-1] - 255) > 3).mean() > 0.05  # the text reaches the edge row: not flat
        x0, y0, x1, y1 = content_box(grey)
        assert (abs(x0 - 5) <= 1 and abs(y0 - 14) <= 1 and abs(x1 - 121) <= 1 and abs(y1 - 130) <= 1), (x0, y0, x1, y1)
        h, s = compute_hashes(_jpeg(img)), compute_hashes(_jpeg(shot))
        assert s.trimmed and hamming_hex(s.views[0], h.phash) <= 8
