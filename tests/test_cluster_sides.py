"""Side bands (``hashing.SIDE_BANDS``, hashes v7): the content without a tenth
or 15% of its left or right side.

A picture with a flat margin of its own over its top is trimmed to its
scene; an 85% bottom-right crop cuts into the margin (still trimmed) and
15% off the scene's left: once trimmed, a crop of *one side* only, which
no centre, grid or band view meets within 8 bits. The side band does --
and since a band leaves out the part where two pictures may differ, a
side-band pair must agree almost everywhere on informative pixels, and may
join an image but never link two clusters or make an anchor trusted.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench.neardup_transforms import _crop_box, screenshot
from detectors.hashing import SIDE_BANDS, hamming_hex, side_views
from detectors.neardup import ClusterIndex, pair_match
from tests.test_cluster_verify import _h, waves


def scene(seed: int, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    w, h = size
    return 128 + 90 * waves(np.random.default_rng(seed), size, 6, 0.5, 3.0) / 3


def under_a_margin(seed: int, size: tuple[int, int] = (640, 480), margin: float = 0.2) -> Image.Image:
    """A scene under a flat white margin over its top ``margin``."""
    v = scene(seed, size)
    v[: int(size[1] * margin)] = 255
    return Image.fromarray(np.clip(np.stack([v, v * 0.95, v * 0.9], -1), 0, 255).astype(np.uint8))


def _bottom_right(img: Image.Image) -> Image.Image:
    return _crop_box(img, 0.15, 0.15, 1.0, 1.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_one_sided_crop_meets_the_side_band(seed: int):
    img = under_a_margin(seed)
    (_, ho), (_, hc) = _h(img), _h(_bottom_right(img))
    assert ho.trimmed and hc.trimmed
    sides = side_views(ho.views, ho.trimmed)
    assert len(sides) == len(SIDE_BANDS)
    # the crop's trimmed content is the picture's content without its left 15%
    assert hamming_hex(hc.views[0], sides[1]) <= 4


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("crop_first", [False, True])
def test_a_one_sided_crop_joins_its_picture(seed: int, crop_first: bool):
    img = under_a_margin(seed)
    copies = [_h(img), _h(_bottom_right(img))]
    index = ClusterIndex()
    first, second = (index.assign(*c) for c in (copies[::-1] if crop_first else copies))
    assert first.new_cluster and second.cluster_id == first.cluster_id
    assert index.n_clusters == 1


@pytest.mark.parametrize("seed", [4, 5])
def test_a_picture_with_its_left_part_repainted_stays_apart(seed: int):
    """Its side band agrees with the other at the median (60% of the band
    is the same), not almost everywhere: no join, either order."""
    a = scene(seed)
    b = a.copy()
    b[:, : int(0.4 * a.shape[1])] = scene(seed + 100)[:, : int(0.4 * a.shape[1])]
    pics = [Image.fromarray(np.clip(v, 0, 255).astype(np.uint8)).convert("RGB") for v in (a, b)]
    for order in (1, -1):
        index = ClusterIndex()
        ids = [index.assign(*_h(p)).cluster_id for p in pics[::order]]
        assert ids[0] != ids[1] and index.n_clusters == 2


def _dark(seed: int) -> Image.Image:
    """A night shot: black with a few dim lights."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (640, 480), (2, 2, 2))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(40, 600), rng.integers(40, 440)
        d.ellipse((x - 6, y - 6, x + 6, y + 6), fill=(60, 50, 30))
    return img


def test_a_side_band_pair_is_not_verified_on_uninformative_pixels():
    """Two screenshots of different dark pictures: their UI is all the
    pixels say anything about (white margins saturate, the pictures are
    black), so at the median they agree. Even with a hash pair through a
    side band at 0 bits (the query's pHash set to the other's side band, its
    PDQ out of play: under its quality bound, above the flat one), the pair is not verified and the query founds its own
    cluster; a real crop's side band (above) joins."""
    from detectors.neardup.verify import informative
    from detectors.hashing import thumb_array

    _, ha = _h(screenshot(_dark(1)))
    sb, hb = _h(screenshot(_dark(2)))
    ta, tb = thumb_array(ha.thumb), thumb_array(hb.thumb)
    assert informative(ta, (0, 0, 1, 1), tb, (0, 0, 1, 1)) < 128
    assert informative(thumb_array(_h(under_a_margin(1))[1].thumb), (0, 0, 1, 1), ta, (0, 0, 1, 1)) >= 128
    side = side_views(ha.views, ha.trimmed)[1]
    query = hb.model_copy(update={"phash": side, "phash_mirror": None, "pdq_quality": 40, "trimmed": False,
                                  "views": None, "content_box": None})
    index = ClusterIndex()
    a = index.assign("a" * 64, ha)
    b = index.assign(sb, query)
    assert b.cluster_id != a.cluster_id and b.new_cluster
    # the hash-only rule (banks, ``deepwatch similar``) never pairs side bands:
    # without pixels nothing would check the part they leave out
    # (the same answer with the side bands scrambled; the 0-bit side pair is not it)
    n = len(SIDE_BANDS)
    flipped = ha.model_copy(update={"views": ha.views[:-n] + [f"{int(v, 16) ^ (2**64 - 1):016x}" for v in ha.views[-n:]]})
    found = pair_match(query, ha, view_threshold=8)
    assert found == pair_match(query, flipped, view_threshold=8) and (found is None or found[0] > 0)
