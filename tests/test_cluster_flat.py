"""Flat and dark pictures (session 8).

A black camera frame and a nearly black camera fixture split into up to seven
clusters on the cluster bench:

* a one-colour picture has no hash (pHash and PDQ of a flat frame are noise),
  and its captioned copies are not trimmed -- what a trim would leave is flat
  -- so every hash of such a copy shows the caption. ``ClusterIndex`` now
  indexes a one-colour representative by its grey level and meets it with the
  level of an image's content or of the bands a caption bar leaves
  (``verify.uniform_level``, via ``"uniform"``);
* a dark picture is "flat" by its PDQ quality, while its caption-bar copy is
  "detailed" by the bar's, and flat met only flat. A flat/detailed pair may
  now pair when their pixels agree nearly everywhere (``_flat_agrees``).
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from bench.neardup_transforms import _bar, _caption
from detectors.neardup import ClusterIndex
from detectors.neardup.clusters import FLAT_QUALITY
from detectors.neardup.verify import uniform_level
from tests.test_cluster_verify import _h, waves


def flat(level: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    return Image.new("RGB", size, (level, level, level))


def _copies(img: Image.Image) -> list[Image.Image]:
    """The cluster bench's caption shapes: bars at either edge or both, text."""
    return [
        _bar(img, 1 / 6, "bottom", fill=(255, 255, 255), text="share before they delete it"),
        _bar(img, 1 / 8, "top", fill=(255, 255, 255), text="you won't believe this"),
        _bar(img, 1 / 6, "both", text="WHEN YOU SEE IT"),
        _caption(img),
    ]


def dark(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A night shot: faint texture within a dozen grey levels of black."""
    v = 6 + 5 * waves(np.random.default_rng(seed), size, 6, 1.0, 4.0) / 3
    return Image.fromarray(np.clip(np.stack([v, v, v], -1), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("copies_first", [False, True])
def test_a_black_frames_captioned_copies_join_it(copies_first: bool):
    frame = [_h(flat(0)), _h(flat(0), q=70)]
    copies = [_h(c) for c in _copies(flat(0))]
    assert all(not h.trimmed for _, h in copies), "nothing to trim to: the rest is flat"
    idx = ClusterIndex()
    for sha, h in (copies + frame) if copies_first else (frame + copies):
        idx.assign(sha, h)
    assert idx.n_clusters == 1, "one black frame, with and without captions"


def test_one_colour_pictures_of_other_levels_and_detailed_captions_stay_apart():
    idx = ClusterIndex()
    black, grey = _h(flat(0)), _h(flat(128))
    for sha, h in (black, grey):
        idx.assign(sha, h)
    grey_copy = _h(_copies(flat(128))[0])
    assert idx.assign(*grey_copy).cluster_id == idx.cluster_of(grey[0])
    # a detailed picture under the same caption bar is not the black frame
    scene = Image.fromarray(np.clip(128 + 40 * waves(np.random.default_rng(5), (400, 300), 6, 1.0, 4.0),
                                    0, 255).astype(np.uint8)).convert("RGB")
    a = idx.assign(*_h(_copies(scene)[0]))
    assert a.new_cluster and idx.n_clusters == 3


def test_uniform_level_of_a_band_ignores_the_caption_bar():
    from detectors.hashing import thumb_array

    _, h = _h(_copies(flat(0))[0])
    t = thumb_array(h.thumb)
    assert uniform_level(t) is None, "the whole frame shows the bar"
    assert uniform_level(t, (0.0, 0.0, 1.0, 5 / 6)) is not None, "what the bar leaves is one colour"


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("copy_first", [False, True])
def test_a_dark_pictures_caption_bar_copy_joins_it(seed: int, copy_first: bool):
    pic = _h(dark(seed))
    copy = _h(_bar(dark(seed), 1 / 8, "top", fill=(255, 255, 255), text="you won't believe this"))
    assert pic[1].pdq_quality < FLAT_QUALITY <= copy[1].pdq_quality, "flat by PDQ, and detailed by its bar"
    assert copy[1].trimmed
    idx = ClusterIndex()
    for sha, h in (copy, pic) if copy_first else (pic, copy):
        idx.assign(sha, h)
    assert idx.n_clusters == 1


def test_a_flat_and_a_detailed_image_whose_hashes_meet_need_pixels_that_agree_everywhere():
    """A record whose hashes are the dark picture's but whose pixels hold a
    bright spot (a moon on the night sky): the median agrees, the picture
    does not."""
    sha, h = _h(dark(1))
    t = np.frombuffer(base64.b64decode(h.thumb), dtype=np.uint8).reshape(32, 32).copy()
    t[14:18, 14:18] = 230  # in the middle: every view of the picture holds it
    moon = h.model_copy(update={"pdq_quality": 100, "thumb": base64.b64encode(t.tobytes()).decode()})
    idx = ClusterIndex()
    idx.assign(sha, h)
    assert idx.assign("f" * 64, moon).new_cluster
    # the same record without the spot joins: the spot is what tells them apart
    same = h.model_copy(update={"pdq_quality": 100})
    assert not idx.assign("e" * 64, same).new_cluster
