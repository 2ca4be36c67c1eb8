"""An edit of a picture stays apart from the picture (``ClusterIndex`` with a
pixel source, ``detectors.neardup.localized``), its reposts do not.

The 32x32 record verifies on the *median* residual, which ignores a caption
over a sixth of the picture and so ignores an object painted into it just
as well. A generative edit re-renders the whole picture slightly too (the
residual lands in the borderline band, >= ``EDIT_FROM``), and there the
images' own pixels are compared: one part of the interior differing by far
more than the rest is an edit. The pictures are synthetic: a detailed
photo-like picture, and a copy re-rendered with a smooth field of a few
grey levels and one object painted in (another texture at the same mean,
so pHash and the median barely move)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bench.neardup_transforms import _bar, _crop
from detectors.hashing import ImageHashes, compute_hashes
from detectors.imagedata import ImageData
from detectors.neardup import ClusterIndex
from detectors.neardup.clusters import _Query
from detectors.neardup.localized import EDIT_PEAK, grey, local_peak
from tests.test_cluster_splits import detailed


def edited(img: Image.Image, seed: int, amp: float = 8.0, r: float = 0.1, contrast: float = 80.0) -> Image.Image:
    """``img`` re-rendered (a smooth field of +-``amp`` grey levels) with one
    object painted in: inside an ellipse of radius ``r`` (of the width), a
    light-and-shadow texture at the region's own mean."""
    w, h = img.size
    rng = np.random.default_rng(seed + 100)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    field = np.zeros((h, w))
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 2, 2).tolist() + [rng.uniform(0, 6.3)]
        field += np.sin(2 * np.pi * (fx * x + fy * y) + ph)
    a = np.asarray(img, dtype=float) + amp * field[..., None] / 2
    inside = ((x - 0.45) / r) ** 2 + ((y - 0.5 * h / w) / (1.2 * r)) ** 2 <= 1
    a[inside] = a[inside].mean(axis=0) + (contrast * np.sin(2 * np.pi * 6 * (x + 0.5 * y)))[inside][:, None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(img: Image.Image, q: int = 88) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


class Blobs:
    """A pixel source over bytes kept by sha256 (the blob store's role);
    ``drop`` forgets one, as an evicted blob."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.asked: list[str] = []

    def add(self, data: bytes) -> tuple[str, ImageHashes]:
        d = ImageData(data)
        self.data[d.sha256] = data
        return d.sha256, compute_hashes(d)

    def __call__(self, sha256: str) -> bytes | None:
        self.asked.append(sha256)
        return self.data.get(sha256)


# seed -> (re-render field, the painted object's contrast): the record's
# residual in the band that is re-verified (>= EDIT_FROM), the object strong
# enough to be an edit and mild enough that pHash still pairs the two
EDIT = {1: (8.0, 80.0), 8: (10.0, 110.0)}
SEEDS = list(EDIT)


def _pair(seed: int):
    img = detailed(seed, (480, 360), amp=0.5)
    return img, edited(img, seed, amp=EDIT[seed][0], contrast=EDIT[seed][1])


@pytest.mark.parametrize("seed", SEEDS)
def test_the_edit_verifies_on_the_record_in_the_borderline_band(seed: int):
    """The precondition: without pixels the edit joins its picture, through a
    pair whose median residual is in the band the pixels re-verify."""
    img, ed = _pair(seed)
    blobs = Blobs()
    (sp, hp), (se, he) = blobs.add(jpeg(img)), blobs.add(jpeg(ed))
    index = ClusterIndex()
    founder = index.assign(sp, hp)
    match = index._picture_match(founder.cluster_id, he, _Query.of(he, se))
    assert match is not None and index.edit_from <= match[4] <= 6.0
    assert index.assign(se, he).cluster_id == founder.cluster_id


@pytest.mark.parametrize("seed", SEEDS)
def test_the_local_peak_tells_the_edit_from_the_reposts(seed: int):
    img, ed = _pair(seed)
    g = grey(jpeg(img))
    assert local_peak(grey(jpeg(ed)), (0, 0, 1, 1), g, (0, 0, 1, 1)) > EDIT_PEAK + 5
    for copy in (jpeg(img, 70), jpeg(img.resize((240, 180)))):
        assert local_peak(grey(copy), (0, 0, 1, 1), g, (0, 0, 1, 1)) < EDIT_PEAK / 2


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("edit_first", [False, True])
def test_an_edited_copy_stays_apart_while_reposts_join(seed: int, edit_first: bool):
    """With the pixel source the edit founds its own cluster (either order);
    the picture's recompressed, half-size, captioned and 90%-cropped copies
    join the picture, not the edit."""
    img, ed = _pair(seed)
    blobs = Blobs()
    index = ClusterIndex(pixels=blobs)
    orig, edit = blobs.add(jpeg(img)), blobs.add(jpeg(ed))
    first, second = (edit, orig) if edit_first else (orig, edit)
    a, b = index.assign(*first), index.assign(*second)
    assert a.cluster_id != b.cluster_id and index.n_clusters == 2
    picture = index.cluster_of(orig[0])
    copies = [jpeg(img, 70), jpeg(img.resize((240, 180))),
              jpeg(_bar(img, 1 / 8, "bottom", fill=(0, 0, 0), text="you won't believe this")), jpeg(_crop(img, 0.9))]
    for data in copies:
        sha, h = blobs.add(data)
        assert index.assign(sha, h).cluster_id == picture
    assert index.n_clusters == 2 and index.edits is not None and index.edits.runs >= 1


@pytest.mark.parametrize("seed", SEEDS)
def test_a_missing_blob_falls_back_to_the_record(seed: int):
    """No bytes for the edit (blob evicted): the record alone decides, as
    without a pixel source -- the edit joins, and the same ops give the same
    clusters as an index without pixels."""
    img, ed = _pair(seed)
    blobs = Blobs()
    orig = blobs.add(jpeg(img))
    sha, h = ImageData(jpeg(ed)).sha256, compute_hashes(ImageData(jpeg(ed)))  # never stored
    index, plain = ClusterIndex(pixels=blobs), ClusterIndex()
    for ix in (index, plain):
        ix.assign(*orig)
    assert index.assign(sha, h).cluster_id == plain.assign(sha, h).cluster_id == index.cluster_of(orig[0])
    assert sha in blobs.asked and index.edits.runs == 0


def test_the_check_runs_only_on_borderline_pairs():
    """A plain recompress verifies far below ``EDIT_FROM``: no pixels read."""
    img = detailed(3, (480, 360), amp=0.5)
    blobs = Blobs()
    index = ClusterIndex(pixels=blobs)
    index.assign(*blobs.add(jpeg(img)))
    index.assign(*blobs.add(jpeg(img, 70)))
    assert index.n_clusters == 1 and not blobs.asked and index.edits.runs == 0


def test_the_same_ops_and_blobs_give_the_same_clusters():
    """Replay: a fresh index fed the same ops over the same blobs decides
    the same (the check reads content-addressed bytes only)."""
    img, ed = _pair(1)
    blobs = Blobs()
    ops = [blobs.add(jpeg(ed)), blobs.add(jpeg(img)), blobs.add(jpeg(img, 70)), blobs.add(jpeg(_crop(img, 0.9)))]
    runs = []
    for _ in range(2):
        index = ClusterIndex(pixels=blobs)
        runs.append([index.assign(sha, h).cluster_id for sha, h in ops])
    assert runs[0] == runs[1] and len(set(runs[0])) == 2


def _feed(img: Image.Image, ed: Image.Image) -> list[tuple[str, Image.Image]]:
    """The edit's and the picture's reposts, interleaved (``_bar``/``_crop`` shapes of the bench)."""
    from bench.neardup_transforms import CLUSTER_TRANSFORMS
    out = []
    for t in ("jpeg_q70", "jpeg_q50", "resize_0.5", "crop_90", "bar_bottom_1/6_white", "border_white", "screenshot",
              "mirror", "brightness_+20%", "crop_90_topleft"):
        out += [("edit", CLUSTER_TRANSFORMS[t](ed)), ("picture", CLUSTER_TRANSFORMS[t](img))]
    return out


@pytest.mark.parametrize("merge_edit_from", [None, 0.0])
def test_a_representative_link_between_an_edit_and_its_picture_is_refused_on_pixels(merge_edit_from):
    """The edit is told apart on its first join (residual >= ``EDIT_FROM``).
    Later the picture's off-centre crop becomes an anchor, and its pair with
    the edit's founder verifies at a residual just below ``EDIT_FROM``: under
    the session 9 rule (``merge_edit_from=None``) that representative link
    merged the two clusters back; a merge is now re-verified on pixels from
    ``merge_edit_from`` and refused. Every repost stays with its own picture."""
    seed = 8
    img, ed = _pair(seed)
    blobs = Blobs()
    index = ClusterIndex(pixels=blobs, merge_edit_from=merge_edit_from)
    picture = index.assign(*blobs.add(jpeg(img))).cluster_id
    edit = index.assign(*blobs.add(jpeg(ed))).cluster_id
    assert picture != edit
    merges = []
    for which, data in _feed(img, ed):
        a = index.assign(*blobs.add(data))
        merges += a.merge_audit
        if merge_edit_from is not None:
            assert a.cluster_id == (edit if which == "edit" else picture), which
    if merge_edit_from is None:  # the precondition: the link the stricter rule refuses
        assert index.n_clusters == 1 and any(m.representative_residual is not None
                                             and m.representative_residual < index.edit_from for m in merges)
    else:
        assert index.n_clusters == 2 and not merges


@pytest.mark.parametrize("merge_edit_from", [None, 0.0])
def test_a_refused_join_is_not_undone_by_a_later_weaker_pair(merge_edit_from):
    """The edit founds its own cluster (its hashes are too far from the
    picture's). Its first recompressed copy meets both, and the edit's
    founder would join the picture through a pair just below ``EDIT_FROM``:
    under the session 9 rule (``merge_edit_from=None``) that representative
    link merged them. Now the merge is re-verified and refused, and both
    clusters are marked ``apart``: the later reposts of either, which meet
    the other picture through pairs below ``EDIT_FROM`` too, are re-verified
    on pixels as well (without the mark one of them joined the wrong
    picture). Every repost ends with its own picture."""
    img = detailed(6, (480, 360), amp=0.5)
    ed = edited(img, 6, amp=10.0, contrast=110.0)
    blobs = Blobs()
    index = ClusterIndex(pixels=blobs, merge_edit_from=merge_edit_from)
    picture = index.assign(*blobs.add(jpeg(img))).cluster_id
    edit = index.assign(*blobs.add(jpeg(ed))).cluster_id
    assert picture != edit
    wrong = 0
    for which, data in _feed(img, ed):
        wrong += index.assign(*blobs.add(data)).cluster_id != (edit if which == "edit" else picture)
    if merge_edit_from is None:  # the precondition: the weaker pairs undid the separation
        assert wrong and index.n_clusters == 1
    else:
        assert wrong == 0 and index.n_clusters == 2
        assert all(c.apart for c in index._clusters.values())


@pytest.mark.parametrize("merge_edit_from", [None, 0.0])
def test_a_copy_that_would_bridge_through_a_wrong_join_founds_apart(merge_edit_from):
    """The edit came first; the picture's crop founded a cluster of its own.
    The picture's half-size copy meets only the edit's cluster (a pair
    below ``EDIT_FROM``: never checked), joins it as an anchor and bridges
    the crop's cluster through itself -- under the session 9 rule
    (``merge_edit_from=None``) the picture and the edit end in one
    cluster. A representative about to bridge re-verifies its own join:
    the copy shows an edit of the cluster it joined, its join is undone,
    and it founds the picture's cluster (with its crop) apart from the edit."""
    from bench.neardup_transforms import CLUSTER_TRANSFORMS
    img = detailed(6, (480, 360), amp=0.5)
    ed = edited(img, 6, amp=10.0, contrast=110.0)
    blobs = Blobs()
    index = ClusterIndex(pixels=blobs, merge_edit_from=merge_edit_from)
    edit_sha, h = blobs.add(CLUSTER_TRANSFORMS["jpeg_q70"](ed))
    edit = index.assign(edit_sha, h).cluster_id
    crop_sha, h = blobs.add(CLUSTER_TRANSFORMS["crop_85_bottomright"](img))
    assert index.assign(crop_sha, h).cluster_id != edit
    copy = index.assign(*blobs.add(CLUSTER_TRANSFORMS["resize_0.5"](img)))
    assert copy.merged  # the crop's cluster is bridged either way
    if merge_edit_from is None:  # the precondition: through a join to the edit
        assert copy.cluster_id == edit and index.n_clusters == 1
    else:
        assert copy.new_member and copy.cluster_id not in (edit,) and index.cluster_of(crop_sha) == copy.cluster_id
        assert index.members(edit) == [edit_sha] and index.n_clusters == 2 and index.n_members == 3


def test_the_apart_marks_survive_a_rebuild_from_engine_state():
    """The marks live in engine state (``ClusterState.apart``): an engine
    rebuilt from the stored states -- a restart, a rebalance -- has them
    back, so it re-verifies joins of the marked clusters as the one that set
    them did, and the later reposts still end with their own picture."""
    from datetime import timedelta

    from streams.clustering import ClusterEngine, ClusterState
    from streams.demo_feed import BASE_TIME
    from streams.records import ClusterOp, ImageEvent, Sighting, SourceRef
    from streams.settings import Settings

    img = detailed(6, (480, 360), amp=0.5)
    ed = edited(img, 6, amp=10.0, contrast=110.0)
    blobs = Blobs()
    table: dict[str, bytes] = {}

    def apply(engine: ClusterEngine, data: bytes, n: int) -> str:
        sha, hashes = blobs.add(data)
        im = ImageData(data)
        ev = ImageEvent.model_validate({"event_id": f"e{n}", "platform": "x", "account_id": "a",
                                        "posted_at": (BASE_TIME + timedelta(minutes=n)).isoformat(),
                                        "image": {"url": "https://img.example/x.jpg"}})
        s = Sighting(event=ev, source=SourceRef(topic="t", partition=0, offset=n), sha256=sha,
                     width=im.size[0], height=im.size[1], format=im.format, hashes=hashes)
        out = engine.apply(ClusterOp(kind="sighting", sighting=s), n,
                           lambda c: ClusterState.loads(table[c]) if c in table else None)
        for cid, st in out.writes.items():
            table[cid] = st.dumps()
        return out.snapshots[-1].cluster_id

    settings = Settings()
    first = ClusterEngine(settings, pixels=blobs)
    picture, edit = apply(first, jpeg(img), 0), apply(first, jpeg(ed), 1)
    feed = list(_feed(img, ed))
    which, data = feed[0]
    assert apply(first, data, 2) == (edit if which == "edit" else picture)
    assert all(ClusterState.loads(raw).apart for raw in table.values())  # both marked, and stored

    rebuilt = ClusterEngine(settings, pixels=blobs)
    rebuilt.rebuild(ClusterState.loads(raw) for raw in table.values())
    assert rebuilt.index._clusters[picture].apart and rebuilt.index._clusters[edit].apart
    for n, (which, data) in enumerate(feed[1:], 3):
        assert apply(rebuilt, data, n) == (edit if which == "edit" else picture), which
