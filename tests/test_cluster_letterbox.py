"""Pictures with a flat margin of their own, letterboxed (``HASHES_VERSION`` 7).

A face on a black backdrop, or a night scene under a dark sky, is trimmed to
its subject like a framed copy. Its letterboxed copy must trim to the *same*
subject: before version 7 the rows were measured across the letterbox's
black bars, so every row of a dark picture counted as border (no trim at
all: the copy kept the bars and met nothing) or the trim ran into the
picture (a copy a fifth smaller than the original's trim). Rows are now
measured inside the columns that are flat as an edge (the bars), and a
border line of another colour continues a trim only when it is flat as an
edge itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.neardup_transforms import _letterbox
from detectors.hashing import content_box
from detectors.neardup import ClusterIndex
from tests.test_cluster_verify import _h, waves


def subject_on_black(seed: int, size: tuple[int, int] = (400, 400)) -> Image.Image:
    """A textured subject (a head and shoulders: an ellipse reaching the
    bottom edge) on a black backdrop that fills the top and both sides."""
    w, h = size
    rng = np.random.default_rng(seed)
    tex = 150 + 60 * waves(rng, size, 6, 1.0, 4.0) / 3
    y, x = np.mgrid[0:h, 0:w]
    head = ((x - 0.45 * w) / (0.2 * w)) ** 2 + ((y - 0.55 * h) / (0.4 * h)) ** 2 <= 1
    body = (y >= 0.8 * h) & (np.abs(x - 0.45 * w) <= 0.27 * w)
    v = np.where(head | body, np.clip(tex, 40, 250), 0.0)
    return Image.fromarray(np.stack([v, v * 0.9, v * 0.8], -1).astype(np.uint8))


def dark_scene(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A night scene: a black sky over the top third (flat as an edge: the
    picture's own margin), a lit, textured street below it with a black
    shadow over its left 60% down to two thirds of the height -- rows that
    the letterbox's bars beside them made border."""
    w, h = size
    rng = np.random.default_rng(seed)
    v = 90 + 70 * waves(rng, size, 6, 1.0, 4.0) / 3
    v[: h // 3] = 1
    v[h // 3 : 2 * h // 3, : int(0.6 * w)] = 1
    return Image.fromarray(np.clip(np.stack([v, v, v * 0.9], -1), 0, 255).astype(np.uint8))


def _frac_box(img: Image.Image) -> tuple[float, float, float, float] | None:
    _, h = _h(img)
    return h.content_box


def _in_letterbox(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, ...]:
    """The original's content box in the coordinates of its letterboxed frame."""
    w, h = size
    lb = _letterbox(Image.new("RGB", size))
    ox, oy = (lb.width - w) // 2, (lb.height - h) // 2
    x0, y0, x1, y1 = box
    return ((ox + x0 * w) / lb.width, (oy + y0 * h) / lb.height, (ox + x1 * w) / lb.width, (oy + y1 * h) / lb.height)


@pytest.mark.parametrize("make,seed", [(subject_on_black, 1), (subject_on_black, 2), (dark_scene, 3), (dark_scene, 4)])
def test_a_letterboxed_copy_trims_to_the_pictures_own_trim(make, seed: int):
    img = make(seed)
    own = _frac_box(img)
    assert own is not None, "the picture trims to its subject"
    boxed = _frac_box(_letterbox(img))
    assert boxed is not None, "the letterboxed copy trims too"
    want = _in_letterbox(own, img.size)
    assert np.allclose(boxed, want, atol=0.02), (boxed, want)


@pytest.mark.parametrize("make,seed", [(subject_on_black, 1), (dark_scene, 3)])
@pytest.mark.parametrize("letterbox_first", [False, True])
def test_a_letterboxed_copy_joins_its_picture(make, seed: int, letterbox_first: bool):
    img = make(seed)
    copies = [_h(img, 90), _h(_letterbox(img))]
    index = ClusterIndex()
    first, second = (index.assign(*c) for c in (copies[::-1] if letterbox_first else copies))
    assert first.new_cluster
    assert second.cluster_id == first.cluster_id and not second.new_cluster
    assert index.n_clusters == 1


def test_a_small_picture_letterboxed_keeps_its_content():
    """The content may keep less than 30% of the frame's width when the area
    is large enough (a portrait subject letterboxed to 16:9); a speck on a
    flat frame is still no content."""
    img = subject_on_black(5, (300, 400))
    g = np.asarray(_letterbox(img).convert("L"), dtype=np.float32)
    x0, y0, x1, y1 = content_box(g)
    assert (x1 - x0) / g.shape[1] < 0.3 and (y1 - y0) / g.shape[0] > 0.7
    speck = np.zeros((200, 200), dtype=np.float32)
    speck[90:110, 90:110] = 200
    assert content_box(speck) is None
