"""The edit check's image cache is bounded in bytes, not only in count.

``grey`` keeps at most ``WORK_SIDE`` on the short side only, so a long strip
(a panorama, a stitched screenshot) stays 16384 x 256 = 4 MB of grey; a cache
of 256 such entries in a long-running cluster-stage worker held ~1 GB. The
bound is what the count means for usual pictures (256 of ~90 KB)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from detectors.neardup.localized import WORK_SIDE, EditCheck, grey

BUDGET = 256 * 90 * 1024  # what ``max_images`` was sized for: 256 pictures of ~90 KB


def _png(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _cached_bytes(check: EditCheck) -> int:
    return sum(im.width * im.height for im in check._images.values() if im is not None)


def test_long_strips_stay_within_the_byte_budget():
    strip = _png(16384, WORK_SIDE, 1)
    assert grey(strip).size == (16384, WORK_SIDE)  # the short side is the only bound: 4 MB of grey
    check = EditCheck(lambda sha: strip)
    for i in range(12):  # 48 MB of strips, twice the budget
        im = check.image(f"strip-{i}")
        assert im is not None and im.size == (16384, WORK_SIDE)  # the caller still gets the pixels
        assert _cached_bytes(check) <= BUDGET
    assert "strip-11" in check._images  # the newest stays, the oldest went
    assert "strip-0" not in check._images


def test_usual_pictures_keep_the_count_bound():
    # 4:3 pictures are ~87 KB of grey: 256 of them fit the budget, the count decides
    pic = _png(1024, 768, 2)
    assert grey(pic).size == (341, WORK_SIDE)
    check = EditCheck(lambda sha: pic)
    for i in range(257):
        check.image(f"pic-{i}")
    assert len(check._images) == 256
    assert "pic-0" not in check._images and "pic-1" in check._images


def test_evicted_image_comes_back_the_same_and_accounting_holds():
    strip, pic = _png(16384, WORK_SIDE, 3), _png(640, 480, 4)
    data = {"pic": pic, **{f"strip-{i}": strip for i in range(8)}, "gone": None}
    check = EditCheck(lambda sha: data.get(sha))
    first = check.image("pic")
    assert check.image("gone") is None  # no pixels: cached as None, costs nothing
    for i in range(8):
        check.image(f"strip-{i}")
    assert "pic" not in check._images  # pushed out by bytes, well under the count
    again = check.image("pic")
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert check._image_bytes == _cached_bytes(check) <= BUDGET
