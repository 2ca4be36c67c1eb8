"""A copy that trims where its picture does not: a picture on a light,
slightly textured backdrop (not flat: untrimmed) whose brightened repost
saturates the backdrop to flat white (trimmed). The repost's whole frame is
the picture's full frame: since hashes v7 the two meet (verified on pixels
through the repost's content box); before, a trimmed image's whole frame met
only crop views and other whole frames."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.neardup_transforms import TRANSFORMS
from detectors.imagedata import ImageData
from detectors.neardup import ClusterIndex
from tests.test_cluster_verify import _h, waves


def on_light_backdrop(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A scene whose left quarter is a light backdrop with sensor noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    v = 226 + rng.normal(0, 4, (h, w))
    _, x = np.mgrid[0:h, 0:w]
    v = np.where(x >= 0.25 * w, 110 + 50 * waves(rng, size, 6, 0.5, 3.0) / 3, v)  # the backdrop: the left quarter
    return Image.fromarray(np.clip(np.stack([v, v, v], -1), 0, 255).astype(np.uint8))


def _hashes(data: bytes):
    d = ImageData(data)
    from detectors.hashing import compute_hashes
    return d.sha256, compute_hashes(d)


# seeds whose copy met the picture through no view or band within 8 bits before
@pytest.mark.parametrize("seed", [4, 7])
@pytest.mark.parametrize("copy_first", [False, True])
def test_a_brightened_copy_that_trims_joins_its_untrimmed_picture(seed: int, copy_first: bool):
    img = on_light_backdrop(seed)
    sa, ha = _h(img)
    sb, hb = _hashes(TRANSFORMS["brightness_+20%"](img))
    assert not ha.trimmed and hb.trimmed
    index = ClusterIndex()
    pair = [(sa, ha), (sb, hb)]
    first, second = (index.assign(*p) for p in (pair[::-1] if copy_first else pair))
    assert second.cluster_id == first.cluster_id and index.n_clusters == 1


@pytest.mark.parametrize("seed", [4, 7])
def test_a_brightened_copy_of_another_scene_on_the_same_backdrop_stays_apart(seed: int):
    """Whole frame against full frame is verified on the content: the same
    backdrop with another scene in it is another picture."""
    sa, ha = _h(on_light_backdrop(seed + 100))
    sb, hb = _hashes(TRANSFORMS["brightness_+20%"](on_light_backdrop(seed)))
    index = ClusterIndex()
    assert index.assign(sa, ha).cluster_id != index.assign(sb, hb).cluster_id
