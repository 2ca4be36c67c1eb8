"""Hash record v6: a trimmed image carries its whole frame's centre crops and
its content box, so a picture with a flat margin of its own -- which every
copy trims differently (a crop cuts the margin away, a caption bar meets it)
-- still meets its reposts, verified on pixels mapped through each side's
content box; and screenshots of different pictures, whose whole frames now
meet, stay apart."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.neardup_transforms import CLUSTER_TRANSFORMS, _crop, screenshot
from detectors.hashing import (
    FRAME_CROPS, N_VIEWS, ImageHashes, compute_hashes, frame_extras, frame_fractions, hamming_hex,
)
from detectors.imagedata import ImageData
from detectors.neardup import ClusterIndex, pair_match
from tests.test_cluster_verify import _h, _lookalikes

# shared pictures with a flat margin of their own (black background, a
# white band) that split over several clusters with v5 records
_MARGIN_PICTURES = ["train-extra/real/yfeng95__PRNet/TestImages__AFLW2000__image02283.jpg",
                    "train-extra/real/InstantID__InstantID/examples__poses__pose.jpg"]
_REPOSTS = ["crop_90", "bar_bottom_1/8_black", "caption_text", "resize_0.5", "jpeg_q70"]


def _as_v5(h: ImageHashes) -> ImageHashes:
    """The record as hashes v5 made it: no frame crops, no content box."""
    if not frame_extras(h.views, h.trimmed):
        return h
    return h.model_copy(update={"views": h.views[: 1 + N_VIEWS], "content_box": None})


def _feed(path: Path) -> list[tuple[str, str, ImageHashes]]:
    img = ImageData.from_path(path).rgb.copy()
    img.thumbnail((1024, 1024))  # as the cluster bench loads it
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    datas = [("original", ImageData(buf.getvalue()))] + [(t, ImageData(CLUSTER_TRANSFORMS[t](img))) for t in _REPOSTS]
    return [(t, d.sha256, compute_hashes(d)) for t, d in datas]


def test_content_box_survives_the_record_and_old_records_have_no_frame_extras():
    box = frame_fractions((10, 0, 90, 75), (100, 100))
    assert box == pytest.approx((0.1, 0.0, 0.9, 0.75))
    h = ImageHashes(phash="0" * 16, pdq="0" * 64, pdq_quality=100, views=["0" * 16] * (1 + N_VIEWS + len(FRAME_CROPS)),
                    trimmed=True, content_box=box)
    assert ImageHashes.model_validate_json(h.model_dump_json()) == h  # the box is a typed field, not a view
    assert frame_extras(None, True) is None
    assert frame_extras(["0" * 16] * (1 + N_VIEWS), True) is None  # a v5 trimmed record
    assert frame_extras(["0" * 16] * N_VIEWS, False) is None  # untrimmed: unchanged layout


def test_a_trimmed_record_carries_frame_crops_that_meet_the_crop_of_its_frame():
    # a picture on a flat white margin above it: the margin is trimmed, and a
    # 90% crop of the whole frame (which cuts most of the margin) is met by
    # the record's frame crop
    a, _ = _lookalikes()
    framed = Image.new("RGB", (a.width, a.height + a.height // 8), (255, 255, 255))
    framed.paste(a, (0, a.height // 8))
    _, h = _h(framed)
    crops, box = frame_extras(h.views, h.trimmed), h.content_box
    assert h.trimmed and crops is not None and box is not None
    assert len(crops) == len(FRAME_CROPS)
    assert box[1] == pytest.approx(1 / 9, abs=0.02) and box[3] == pytest.approx(1.0, abs=0.01)
    sc, hc = _h(_crop(framed, 0.9))
    assert hamming_hex(hc.phash, crops[0]) <= 8
    # the hash-only rule (banks) leaves whole-frame pairs out; clusters verify them on pixels
    n = 1 + N_VIEWS
    flipped = [f"{int(v, 16) ^ (2**64 - 1):016x}" for v in h.views[n : n + len(FRAME_CROPS)]]
    other_frame = h.model_copy(update={"views": h.views[:n] + flipped + h.views[n + len(FRAME_CROPS):],
                                       "phash": f"{int(h.phash, 16) ^ (2**64 - 1):016x}"})
    assert pair_match(hc, other_frame, view_threshold=8) == pair_match(hc, h, view_threshold=8)
    index = ClusterIndex()
    cid = index.assign("0" * 64, h).cluster_id
    a = index.assign(sc, hc)
    assert a.cluster_id == cid and a.via == "phash_view"
    # without pixel verification the frame pair is not taken: the index
    # answers as the hash-only rule does
    plain = ClusterIndex(verify_max=None)
    plain.assign("0" * 64, h)
    assert (plain.lookup(sc, hc) == []) == (pair_match(hc, h, view_threshold=8) is None)


@pytest.mark.parametrize("name", _MARGIN_PICTURES)
def test_a_picture_with_its_own_margin_keeps_its_reposts_in_one_cluster_in_either_order(shared_data: Path, name: str):
    feed = _feed(shared_data / name)
    for order in (1, -1):
        index = ClusterIndex()
        ids = {index.assign(sha, h).cluster_id for _, sha, h in feed[::order]}
        assert len(ids) == 1 and index.n_clusters == 1, order
        # replaying changes nothing
        again = [index.assign(sha, h) for _, sha, h in feed[::order]]
        assert all(not a.new_member and not a.merged for a in again) and index.n_clusters == 1
    # the cause, for the record: the same copies as v5 records (no frame
    # codes) split -- with v5 frame detection; since v7 (rows trimmed inside
    # the columns flat as an edge) the pose picture's copies trim alike and
    # stay together even without frame codes
    old = ClusterIndex()
    for _, sha, h in feed:
        old.assign(sha, _as_v5(h))
    assert old.n_clusters > 1 or "pose" in name


def test_screenshots_of_two_lookalike_pictures_stay_apart_while_their_copies_join():
    a, b = _lookalikes()
    feed = [("a", _h(a)), ("b", _h(b)), ("a", _h(screenshot(a))), ("b", _h(screenshot(b))),
            ("a", _h(_crop(a, 0.9))), ("b", _h(screenshot(_crop(b, 0.9))))]
    sa, sb = feed[2][1][1], feed[3][1][1]
    assert frame_extras(sa.views, sa.trimmed) and frame_extras(sb.views, sb.trimmed)
    assert hamming_hex(sa.phash, sb.phash) <= 10  # the whole frames meet: only pixels tell them apart
    index = ClusterIndex()
    got: dict[str, set[str]] = {"a": set(), "b": set()}
    for pic, (sha, h) in feed:
        got[pic].add(index.assign(sha, h).cluster_id)
    assert len(got["a"]) == 1 and len(got["b"]) == 1 and got["a"] != got["b"]
    assert index.n_clusters == 2


def _night(seed: int) -> Image.Image:
    """A lit band (a detailed picture's rows 36-64%, columns 10-95%) on a
    black night: every copy trims to a strip, each a little differently."""
    from tests.test_cluster_splits import detailed
    d = np.asarray(detailed(seed, (480, 360), amp=0.5), dtype=float)
    a = np.full_like(d, 3.0)
    rows, cols = slice(int(0.36 * 360), int(0.64 * 360)), slice(int(0.1 * 480), int(0.95 * 480))
    a[rows, cols] = d[rows, cols]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("seed", [1, 5])
def test_screenshots_of_a_dark_picture_trimmed_to_a_strip_join_it(seed: int):
    """The screenshot's whole frame meets the picture's, and the part of
    the two regions on both thumbnails is the strip (28% of the frame's
    height): below the 30% asked until session 10 it was not compared, and
    the screenshots founded a cluster of their own."""
    img = _night(seed)
    index = ClusterIndex()
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    picture = index.assign(*_h_bytes(buf.getvalue())).cluster_id
    for t in CLUSTER_TRANSFORMS:
        if t != "screenshot_of_crop_90":  # a crop's screenshot: two trims deep, still apart (not claimed)
            sha, h = _h_bytes(CLUSTER_TRANSFORMS[t](img))
            a = index.assign(sha, h)
            if t.startswith("screenshot"):
                assert a.cluster_id == picture, t
    assert index.n_clusters == 1


def _h_bytes(data: bytes) -> tuple[str, ImageHashes]:
    d = ImageData(data)
    return d.sha256, compute_hashes(d)
