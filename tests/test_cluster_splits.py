"""Splits by arrival order that the cluster rule undoes (``ClusterIndex``):
detailed pictures whose crops meet at a loose median, a crop founded before
a mirrored founder, a whole copy that declined a crop's cluster.

The pictures are synthetic and *detailed*: blocks about the size of a
verification-thumbnail pixel, which an off-centre crop samples at another
phase (as crowds and foliage do in the cluster bench), so the raw
80th-percentile residual of a crop against its picture is well above 6 grey
levels while the picture is the same."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from bench.neardup_transforms import _crop, _crop_box
from detectors.hashing import ImageHashes, thumb_array
from detectors.neardup import ClusterIndex
from detectors.neardup.clusters import MERGE_STRICT, VERIFY_MAX, VERIFY_NEAR, VERIFY_SMOOTH
from detectors.neardup.verify import residual
from tests.test_cluster_verify import _h as _hashed
from tests.test_cluster_verify import waves


def detailed(seed: int, size: tuple[int, int] = (640, 480), amp: float = 0.8) -> Image.Image:
    """Smooth large structure plus flat blocks of 12 px (1/53 of the width), ``amp`` grey levels per level of noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = waves(rng, size, 5, 0.3, 2)
    blocks = Image.fromarray((rng.random((h // 12, w // 12)) * 255).astype(np.uint8))
    noise = np.asarray(blocks.resize((w, h), Image.Resampling.NEAREST), dtype=float)
    v = base * 30 + (noise - 128) * amp + 128
    return Image.fromarray(np.clip(np.stack([v, v * 0.9 + 10, v * 0.8 + 20], -1), 0, 255).astype(np.uint8))


def _h(img: Image.Image, q: int = 85) -> tuple[str, ImageHashes]:
    return _hashed(img, q)


def _bottom_right(img: Image.Image) -> Image.Image:
    return _crop_box(img, 0.15, 0.15, 1.0, 1.0)


@pytest.mark.parametrize("seed", [5, 6])
def test_the_strict_test_blurs_away_a_crops_sampling_phase(seed: int):
    """The link test's 80th percentile is taken on 1-2-1 blurred regions: a
    detailed crop fails it raw (the thumbnail samples it at another phase)
    and passes blurred, well within ``MERGE_STRICT``."""
    img = detailed(seed)
    (_, ho), (_, hc) = _h(img, 90), _h(_bottom_right(img))
    o, c = thumb_array(ho.thumb), thumb_array(hc.thumb)
    box = (0.15, 0.15, 1.0, 1.0)
    assert residual(c, (0, 0, 1, 1), o, box, quantile=0.8) > 6
    assert residual(c, (0, 0, 1, 1), o, box, quantile=0.8, smooth=True) <= MERGE_STRICT / 1.5


@pytest.mark.parametrize("seed", [5, 6])
def test_a_crop_founded_before_a_mirrored_founder_joins_through_an_unmirrored_copy(seed: int):
    """An off-centre crop founds a cluster, then the *mirror* founds the
    picture's; the unmirrored copy meets the mirror only mirrored, so it
    becomes an anchor (its views are the crop's orientation) and bridges the
    crop's cluster."""
    img = detailed(seed)
    index = ClusterIndex()
    crop = index.assign(*_h(_bottom_right(img)))
    mirror = index.assign(*_h(ImageOps.mirror(img)))
    assert crop.new_cluster and mirror.new_cluster
    whole = index.assign(*_h(img, 90))
    assert whole.via in ("phash_mirror", "pdq_mirror") and whole.representative
    assert whole.merged == [crop.cluster_id] and index.n_clusters == 1
    (audit,) = whole.merge_audit
    assert audit.representative_sha256 and audit.representative_residual is not None


@pytest.mark.parametrize("seed", [5, 6])
def test_a_whole_copy_that_declined_a_crops_cluster_bridges_it(seed: int):
    """A centre crop and an off-centre crop found two clusters (neither
    contains the other); the whole picture meets both, joins one and stands
    for its picture, and its representative then bridges the other."""
    img = detailed(seed)
    index = ClusterIndex()
    a = index.assign(*_h(_crop(img, 0.9)))
    b = index.assign(*_h(_bottom_right(img)))
    assert a.new_cluster and b.new_cluster
    whole = index.assign(*_h(img, 90))
    assert whole.representative and not whole.declined
    assert index.n_clusters == 1 and whole.merge_audit
    # replaying the same ops changes nothing
    again = ClusterIndex()
    for im, q in ((_crop(img, 0.9), 85), (_bottom_right(img), 85), (img, 90)):
        again.assign(*_h(im, q))
    assert again.n_clusters == 1 and again.cluster_of(_h(img, 90)[0]) == index.cluster_of(_h(img, 90)[0])


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_a_detailed_crop_just_over_the_median_bound_joins_when_blurred_it_agrees(seed: int):
    """A more detailed picture: its off-centre crop misses the join bound
    by a little at the median (6-7 grey levels) and agrees within 3 blurred,
    so it joins; without that rule it founds a cluster of its own.
    (Look-alikes with different mid-frequency detail are at 9-13 raw and stay
    apart: ``test_cluster_verify``.)"""
    img = detailed(seed, amp=1.6)
    (so, ho), (sc, hc) = _h(img, 90), _h(_bottom_right(img))
    o, c = thumb_array(ho.thumb), thumb_array(hc.thumb)
    box = (0.15, 0.15, 1.0, 1.0)
    assert VERIFY_MAX < residual(c, (0, 0, 1, 1), o, box) <= VERIFY_NEAR
    assert residual(c, (0, 0, 1, 1), o, box, smooth=True) <= VERIFY_SMOOTH
    for smooth, founds in ((None, True), (VERIFY_SMOOTH, False)):
        index = ClusterIndex(verify_smooth=smooth)
        first = index.assign(so, ho)
        crop = index.assign(sc, hc)
        assert crop.new_cluster is founds and (founds or crop.cluster_id == first.cluster_id)
