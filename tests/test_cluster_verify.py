"""Cluster precision with pixel verification: look-alike pictures whose
pHashes are close stay apart, while caption bars, mirrors and brightened
copies still join their picture, and the same ops give the same clusters."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from bench.neardup_transforms import _bar, _crop, screenshot
from detectors.hashing import N_VIEWS, ImageHashes, compute_hashes, frame_extras, hamming_hex, thumb_array
from detectors.imagedata import ImageData
from detectors.neardup import ClusterIndex, pair_match
from detectors.neardup.verify import FULL, aligned_residual, residual


def _h(img: Image.Image, q: int = 88) -> tuple[str, ImageHashes]:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    d = ImageData(buf.getvalue())
    return d.sha256, compute_hashes(d)


def waves(rng: np.random.Generator, size: tuple[int, int], n: int, lo: float, hi: float) -> np.ndarray:
    """A sum of ``n`` plane waves, frequencies in [lo, hi) cycles per longer side."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    out = np.zeros((h, w))
    for _ in range(n):
        fx, fy, ph = rng.uniform(lo, hi, 2).tolist() + [rng.uniform(0, 6.3)]
        out += np.sin(2 * np.pi * (fx * x + fy * y) + ph)
    return out


def _lookalikes(seed: int = 3, size=(480, 360)) -> tuple[Image.Image, Image.Image]:
    """Two pictures with one layout (the same large blobs, as aligned faces or
    one prompt's seeds share) and different content at the scale a viewer
    sees (different mid-frequency detail): pHash cannot tell them apart."""
    base = waves(np.random.default_rng(seed), size, 4, 0.3, 1.5)

    def detail(r: np.random.Generator) -> np.ndarray:
        return waves(r, size, 6, 3, 7)

    def picture(d: np.ndarray) -> Image.Image:
        v = base * 45 + d * 9 + 128
        rgb = np.clip(np.stack([v, v * 0.9 + 10, v * 0.8 + 20], -1), 0, 255).astype(np.uint8)
        return Image.fromarray(rgb)

    return picture(detail(np.random.default_rng(seed + 100))), picture(detail(np.random.default_rng(seed + 200)))


def test_lookalikes_are_hash_neighbours_but_pixels_differ():
    a, b = _lookalikes()
    (_, ha), (_, hb) = _h(a), _h(b)
    assert hamming_hex(ha.phash, hb.phash) <= 10  # the old rule's pair match
    assert pair_match(ha, hb) is not None
    assert residual(thumb_array(ha.thumb), FULL, thumb_array(hb.thumb), FULL) > 6.0


def test_two_similar_but_different_pictures_stay_apart_while_their_reposts_join():
    a, b = _lookalikes()
    old = ClusterIndex(verify_max=None)  # hashes alone: one cluster
    assert old.assign(*_h(a)).cluster_id == old.assign(*_h(b)).cluster_id
    index = ClusterIndex()
    ca, cb = index.assign(*_h(a)).cluster_id, index.assign(*_h(b)).cluster_id
    assert ca != cb
    for img, want in ((a, ca), (b, cb)):
        for variant in (_crop(img, 0.9), img.resize((240, 180)), ImageOps.mirror(img),
                        _bar(img, 1 / 8, "bottom", text="BREAKING NEWS"), screenshot(img)):
            assert index.assign(*_h(variant, 70)).cluster_id == want
    assert index.n_clusters == 2


def test_aligned_gan_faces_stay_apart(shared_data: Path):
    """Style-mixing outputs of one coarse source: same pose and layout, 0-4
    pHash bits apart; the old rule put them in one cluster."""
    d = shared_data / "train-extra" / "ai" / "podgorskiy__ALAE"
    files = [d / f"style_mixing__output__rec_coarse_5_{i}.jpg" for i in (2, 3, 4)]
    if not all(f.is_file() for f in files):
        pytest.skip(f"ALAE style-mixing samples not in {d}")
    hashes = [compute_hashes(ImageData.from_path(f)) for f in files]
    index = ClusterIndex()
    ids = {index.assign(str(i), h).cluster_id for i, h in enumerate(hashes)}
    assert len(ids) == 3


@pytest.mark.parametrize("order", ["picture first", "caption first"])
def test_caption_bars_up_to_a_sixth_join_their_picture_in_either_order(shared_data: Path, order: str):
    files = sorted((shared_data / "detect-dev" / "real").glob("*.jpg"))[:6]
    joined = total = 0
    for f in files:
        img = ImageData.from_path(f).thumbnail(384).copy()
        for bar in (_bar(img, 1 / 8, "bottom", text="BREAKING NEWS"),
                    _bar(img, 1 / 6, "bottom", fill=(255, 255, 255), text="share before they delete it"),
                    _bar(img, 1 / 6, "both", text="WHEN YOU SEE IT"),
                    _bar(img, 1 / 8, "top", fill=(255, 255, 255), text="you won't believe this")):
            index = ClusterIndex()
            first, second = (img, bar) if order == "picture first" else (bar, img)
            c = index.assign(*_h(first)).cluster_id
            joined += index.assign(*_h(second)).cluster_id == c
            total += 1
    assert joined >= total - 1, f"{joined} of {total}"


def test_mirror_and_brightened_copies_join(shared_data: Path):
    files = sorted((shared_data / "detect-dev" / "real").glob("*.jpg"))[:8]
    brighter = 0
    for f in files:
        img = ImageData.from_path(f).thumbnail(384).copy()
        index = ClusterIndex()
        c = index.assign(*_h(img)).cluster_id
        assert index.assign(*_h(ImageOps.mirror(img))).cluster_id == c, f.name
        brighter += index.assign(*_h(ImageEnhance.Brightness(img).enhance(1.2))).cluster_id == c
    # one of these photos has a light border that brightening saturates into
    # a detected frame: its hashes then show a different box (no hash match
    # at all, verification or not); the pixel check itself is gain-matched
    assert brighter >= len(files) - 1, brighter


def test_alignment_search_recovers_copies_trimmed_of_different_bars():
    a, _ = _lookalikes(5)
    top = _bar(a, 1 / 6, "bottom", text="X")  # content: the top five sixths
    t_a = thumb_array(_h(a)[1].thumb)
    t_top = thumb_array(_h(top.crop((0, 0, top.width, round(top.height * 5 / 6))))[1].thumb)
    # the hashes' boxes say "whole picture" on both sides: a sixth apart
    assert residual(t_top, FULL, t_a, FULL) > aligned_residual(t_top, FULL, t_a, FULL, good_enough=0.0)
    assert aligned_residual(t_top, FULL, t_a, FULL, good_enough=0.0) <= 6.0


def test_replaying_the_same_ops_gives_the_same_clusters_merges_and_representatives(shared_data: Path):
    files = sorted((shared_data / "detect-dev" / "real").glob("*.jpg"))[:5]
    feed = []
    for f in files:
        img = ImageData.from_path(f).thumbnail(320).copy()
        for v in (img, _crop(img, 0.85), screenshot(_crop(img, 0.9)), _bar(_crop(img, 0.9), 1 / 8, "bottom", text="B"),
                  ImageOps.mirror(img), _bar(img, 1 / 6, "top", fill=(255, 255, 255), text="share")):
            feed.append((*_h(v), f.name))
    random.Random(7).shuffle(feed)

    def run(index: ClusterIndex):
        return [index.assign(sha, h).model_dump() for sha, h, _ in feed]

    one, two = ClusterIndex(), ClusterIndex()
    first = run(one)
    assert run(two) == first
    again = run(one)  # the same feed again: every image is already a member
    assert all(not a["new_member"] and a["cluster_id"] == one.cluster_of(sha) for a, (sha, _, _) in zip(again, feed))
    assert {sha: one.cluster_of(sha) for sha, _, _ in feed} == {sha: two.cluster_of(sha) for sha, _, _ in feed}
    reps = lambda ix: sorted((cid, r.sha256) for cid, c in ix._clusters.items() for r in c.reps)  # noqa: E731
    assert reps(one) == reps(two)
    pictures: dict[str, set[str]] = {}
    for sha, _, name in feed:
        pictures.setdefault(one.cluster_of(sha), set()).add(name)
    assert all(len(p) == 1 for p in pictures.values())  # compound reposts may split, never mix


def test_a_composite_sharing_most_pixels_with_two_pictures_links_neither():
    """One scene, the scene with its left half repainted, and an in-between
    composite (left quarter repainted) that shares three quarters of its
    pixels with each: it verifies against both at the median and joins one,
    but a link needs agreement almost everywhere, so nothing merges."""
    from tests.test_cluster_precision_pipeline import pictures

    a, b, mid = pictures()
    index = ClusterIndex()
    ca, cb = index.assign(*_h(a)).cluster_id, index.assign(*_h(b)).cluster_id
    assert ca != cb
    m = index.assign(*_h(mid))
    assert m.cluster_id in (ca, cb) and not m.merged and not m.merge_audit
    assert m.declined == [cb if m.cluster_id == ca else ca]  # it met both pictures
    assert index.n_clusters == 2


# One picture's reposts in the cluster bench's feed order (seed 1): its
# crop and caption copies found a second cluster before the copies that
# bridge them arrive, and no single later copy's pixels agree with both
# sides closely enough to link them (80th percentile) -- but one cluster's
# representative joins the other's picture: order alone split them.
_BENCH_ORDER = ["bar_bottom_1/6_white", "mirror_crop_90", "jpeg_q50", "bars_top+bottom_1/6", "resize_0.5",
                "brightness_+20%", "jpeg_q70", "screenshot_q50", "original", "bar_top_1/8_white", "screenshot",
                "screenshot_of_crop_90", "resize_0.25", "caption_text", "bar_bottom_1/8_black", "letterbox_black",
                "border_black_q60", "crop_90_topleft", "crop_90", "crop_80", "mirror", "crop_90_left", "border_white",
                "crop_85_bottomright"]


def test_clusters_split_by_arrival_order_are_joined_by_their_representatives(shared_data: Path):
    from bench.neardup_transforms import CLUSTER_TRANSFORMS

    img = ImageData.from_path(shared_data / "detect-dev" / "ai" / "flux_dev_example.png").rgb.copy()
    img.thumbnail((1024, 1024))  # as the bench loads it
    feed = []
    for t in _BENCH_ORDER:
        if t == "original":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            data = ImageData(buf.getvalue())
        else:
            data = ImageData(CLUSTER_TRANSFORMS[t](img))
        h = compute_hashes(data)
        # as hash records made before v6 (no frame-relative codes, which
        # join this order on their own): they still load and match as before
        if frame_extras(h.views, h.trimmed):
            h = h.model_copy(update={"views": h.views[: 1 + N_VIEWS], "content_box": None})
        feed.append((data.sha256, h))

    # without links by representatives or by pixels: split by arrival order
    before = ClusterIndex(representative_links=False, merge_residual=None)
    for sha, h in feed:
        before.assign(sha, h)
    assert before.n_clusters == 2
    index = ClusterIndex()
    audits = [m for sha, h in feed for m in index.assign(sha, h).merge_audit]
    assert index.n_clusters == 1
    rep_links = [m for m in audits if m.representative_sha256]
    assert rep_links and all(m.representative_residual is not None and m.representative_residual <= 6 for m in rep_links)
    assert all(index.cluster_of(m.representative_sha256) == index.cluster_of(feed[0][0]) for m in rep_links)


def test_two_different_pictures_of_one_subject_stay_apart_under_representative_links():
    """Two pictures of one scene (one half repainted) and reposts of the
    in-between composite that meet both pictures: every such repost
    nominates the pair, but neither picture's representatives (nor the
    anchors the reposts add) join the other's picture, so nothing merges."""
    from tests.test_cluster_precision_pipeline import pictures

    a, b, mid = pictures()
    index = ClusterIndex()
    ca, cb = index.assign(*_h(a)).cluster_id, index.assign(*_h(b)).cluster_id
    nominated = 0
    for copy in (mid, _crop(mid, 0.9), _bar(mid, 1 / 8, "bottom", text="BREAKING"), ImageOps.mirror(mid),
                 screenshot(mid), _crop(a, 0.9), _bar(b, 1 / 6, "top", fill=(255, 255, 255), text="wow")):
        res = index.assign(*_h(copy))
        nominated += bool(res.declined)
        assert res.merged == [] and not res.merge_audit
    assert nominated >= 2  # the composite and its mirror
    assert index.n_clusters == 2 and ca in index and cb in index
