from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from bench.neardup_transforms import screenshot
from detectors.hashing import ImageHashes, compute_hashes
from detectors.imagedata import ImageData
from detectors.neardup import ClusterIndex, HammingIndex, cluster_id_for


def _jpeg(img: Image.Image, q: int = 85) -> ImageData:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return ImageData(buf.getvalue())


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> list[Image.Image]:
    files = sorted((shared_data / "detect-dev" / "real").glob("*.jpg"))[:12]
    return [ImageData.from_path(f).thumbnail(384).copy() for f in files]


def _variants(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    captioned = img.copy()
    ImageDraw.Draw(captioned).text((10, h - 30), "BREAKING: look at this", fill=(255, 255, 255))
    return {
        "crop80": img.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
        "screenshot": screenshot(img),
        "mirrored_crop90": ImageOps.mirror(img.crop((w // 20, h // 20, w - w // 20, h - h // 20))),
        "jpeg50": img,
        "half": img.resize((w // 2, h // 2)),
        "mirror": ImageOps.mirror(img),
        "crop90": img.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
        "caption": captioned,
        "brighter": ImageEnhance.Brightness(img).enhance(1.2),
    }


def _h(img: Image.Image, q: int = 85) -> tuple[str, ImageHashes]:
    d = _jpeg(img, q)
    return d.sha256, compute_hashes(d)


def test_variants_join_the_cluster_and_different_pictures_do_not(photos):
    index = ClusterIndex()
    founders = []
    picture: dict[str, int] = {}  # sha256 -> which photo
    for i, img in enumerate(photos):
        sha, h = _h(img)
        a = index.assign(sha, h)
        assert a.new_cluster and a.cluster_id == cluster_id_for(sha)
        founders.append(a.cluster_id)
        picture[sha] = i
    assert index.n_clusters == len(photos)
    variants: list[tuple[int, str, str]] = []
    for i, img in enumerate(photos):
        for name, v in _variants(img).items():
            sha, h = _h(v, 50 if name == "jpeg50" else 85)
            picture[sha] = i
            index.assign(sha, h)
            variants.append((i, name, sha))
    for c in {index.cluster_of(s) for s in picture}:  # never glues two different pictures
        assert len({picture[m] for m in index.members(c)}) == 1
    missed: dict[str, int] = {}
    missed_photos: set[int] = set()
    for i, name, sha in variants:  # clusters a missed variant founded may merge in later: final state
        if index.cluster_of(sha) != index.cluster_of(next(s for s, j in picture.items() if j == i)):
            missed[name] = missed.get(name, 0) + 1
            missed_photos.add(i)
    # with crop and trimmed-border views, crops and screenshots join too
    # (bench/neardup.py: ~99% at a 90% crop, ~97% at 80%, ~98% screenshots);
    # one of these 12 photos is a hard case whose crops/screenshot miss
    assert len(missed_photos) <= 1, missed
    assert not set(missed) & {"jpeg50", "half", "brighter"}, missed
    # the hard photo has flat edges of its own, detected as a frame: a caption
    # over them moves the frame, and framed images have no mirror match
    assert missed.get("caption", 0) <= 1 and missed.get("mirror", 0) <= 1, missed


def test_original_arriving_after_its_crop_or_screenshot_joins(photos):
    # the reverse direction: the repost founds the cluster, the original comes later
    for name in ("crop90", "crop80", "screenshot"):
        index = ClusterIndex()
        joined = 0
        for img in photos:
            sha_v, hv = _h(_variants(img)[name])
            first = index.assign(sha_v, hv)
            sha_o, ho = _h(img)
            joined += index.assign(sha_o, ho).cluster_id == first.cluster_id
        assert joined >= len(photos) - 1, name
        assert index.n_clusters <= len(photos) + 1


def test_unrelated_pictures_stay_apart_with_views(photos):
    index = ClusterIndex()
    picture: dict[str, int] = {}
    for i, img in enumerate(photos):
        for name in ("crop80", "screenshot", "jpeg50", "crop90"):
            sha, h = _h(_variants(img)[name])
            picture[sha] = i
            index.assign(sha, h)
    clusters = {index.cluster_of(s) for s in picture}
    for c in clusters:  # views never glue two different photos
        assert len({picture[m] for m in index.members(c)}) == 1
    # and almost every photo is one cluster: one hard case (a photo with flat
    # edges of its own, trimmed differently in each variant) may split
    split = [i for i in range(len(photos)) if len({index.cluster_of(s) for s, j in picture.items() if j == i}) > 1]
    assert len(split) <= 1, split


def _viewed(phash: int, views: list[int], trimmed: bool = False) -> ImageHashes:
    return ImageHashes(
        phash=f"{phash:016x}", pdq="0" * 64, pdq_quality=0, views=[f"{v:016x}" for v in views], trimmed=trimmed
    )


def test_view_pairing_rules():
    a, b, c, t = 0, 2**64 - 1, 0x00FF00FF00FF00FF, 0x0F0F0F0F0F0F0F0F  # pairwise >= 32 bits apart
    index = ClusterIndex()  # view radius defaults to 8
    index.assign(_sha(1), _viewed(a, [b, c]))  # an original with crop views b, c
    # a crop of it (its full hash is the original's crop view): joins via the view
    m = index.lookup(_sha(2), _viewed(_flip(b, range(3)), []))
    assert [(x.distance, x.via) for x in m] == [(3, "phash_view")]
    # 9 bits from the view: outside the view radius, though inside the full-frame one
    assert index.lookup(_sha(2), _viewed(_flip(b, range(9)), [])) == []
    # crop view against crop view never counts
    assert index.lookup(_sha(3), _viewed(t, [b, c])) == []
    # a screenshot whose trimmed view is the original
    assert [x.via for x in index.lookup(_sha(4), _viewed(t, [a, b], trimmed=True))] == ["phash_view"]
    # trimmed view against a crop view counts (screenshot of a crop)
    assert [x.via for x in index.lookup(_sha(5), _viewed(t, [c, 12345], trimmed=True))] == ["phash_view"]


def test_members_without_views_still_match_and_rebuild(photos):
    # members rebuilt from stored pHash/PDQ only (no views): the full-frame rule
    # still works, and an image's own views still reach their full hashes
    index = ClusterIndex()
    sha, h = _h(photos[0])
    index.add("c0", sha, ImageHashes(phash=h.phash, pdq=h.pdq, pdq_quality=h.pdq_quality), representative=True)
    assert index.lookup("x", _h(photos[0], 50)[1])[0].cluster_id == "c0"
    assert index.lookup("y", _h(screenshot(photos[0]))[1])[0].via == "phash_view"
    index.remove_cluster("c0")
    assert index.n_members == 0 and len(index._phash) == 0


def test_exact_repeat_is_not_a_new_member(photos):
    index = ClusterIndex()
    sha, h = _h(photos[0])
    first = index.assign(sha, h)
    again = index.assign(sha, h)
    assert again.cluster_id == first.cluster_id
    assert not again.new_member and not again.new_cluster
    assert (again.distance, again.via) == (0, "sha256")
    assert index.n_members == 1


def _fake(phash: int, pdq_quality: int = 0) -> ImageHashes:
    # hand-made hashes: PDQ untrusted (quality 0) so only pHash decides
    return ImageHashes(phash=f"{phash:016x}", pdq="0" * 64, pdq_quality=pdq_quality)


def _sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def _flip(x: int, bits: range) -> int:
    for b in bits:
        x ^= 1 << b
    return x


def _both(phash: int, pdq_flips: range = range(0), pdq_base: int = 0) -> ImageHashes:
    """Hand-made hashes with a trusted PDQ: ``pdq_base`` with ``pdq_flips`` bits flipped."""
    return ImageHashes(phash=f"{phash:016x}", pdq=f"{_flip(pdq_base, pdq_flips):064x}", pdq_quality=90)


def test_image_linking_two_clusters_merges_them_only_when_both_hashes_agree():
    index = ClusterIndex(phash_threshold=10)
    a = index.assign(_sha(1), _both(0))
    index.assign(_sha(2), _both(_flip(0, range(0, 2)), range(0, 4)))  # joins a: a has 2 members
    b = index.assign(_sha(3), _both(_flip(0, range(0, 16)), range(0, 40)))  # 16 / 40 bits from a: new
    assert b.new_cluster
    # pHash 8 from both pictures, PDQ 20 from both: two hashes agree on each side
    bridge = index.assign(_sha(4), _both(_flip(0, range(0, 8)), range(0, 20)))
    assert bridge.cluster_id == a.cluster_id  # more members wins
    assert bridge.merged == [b.cluster_id]
    assert [m.model_dump() for m in bridge.merge_audit] == [{
        "into": a.cluster_id, "other": b.cluster_id, "link_sha256": _sha(4),
        "into_phash": 8, "into_pdq": 20, "other_phash": 8, "other_pdq": 20,
        "into_residual": None, "other_residual": None,  # synthetic hashes: no thumbnails to verify
        "representative_sha256": None, "representative_distance": None, "representative_residual": None}]
    assert b.cluster_id not in index
    assert index.n_clusters == 1 and index.n_members == 4
    assert sorted(index.members(a.cluster_id)) == sorted(_sha(i) for i in (1, 2, 3, 4))


def test_a_link_on_one_hash_alone_joins_the_nearest_picture_and_merges_nothing():
    index = ClusterIndex(phash_threshold=10)
    a = index.assign(_sha(1), _both(0)).cluster_id
    b = index.assign(_sha(2), _both(_flip(0, range(0, 16)), range(0, 40))).cluster_id
    # pHash 7 and 9 from the two pictures, but PDQ 35 bits from b: no merge
    link = index.assign(_sha(3), _both(_flip(0, range(0, 7)), range(0, 5)))
    assert link.cluster_id == a and link.merged == [] and link.declined == [b]
    assert index.n_clusters == 2
    # untrusted PDQ (low detail): pHash alone never links two clusters
    weak = index.assign(_sha(4), _fake(_flip(0, range(0, 8)), pdq_quality=20))
    assert weak.cluster_id in (a, b) and weak.merged == [] and index.n_clusters == 2
    # a flat picture (PDQ quality ~0) is pHash noise: it matches no detailed picture
    assert index.assign(_sha(5), _fake(_flip(0, range(0, 2)))).new_cluster


def test_merge_tie_goes_to_smaller_cluster_id():
    index = ClusterIndex(phash_threshold=10)
    x = index.assign(_sha(10), _both(0)).cluster_id
    y = index.assign(_sha(11), _both(_flip(0, range(0, 16)), range(0, 40))).cluster_id
    bridge = index.assign(_sha(12), _both(_flip(0, range(0, 8)), range(0, 20)))
    assert bridge.cluster_id == min(x, y) and bridge.merged == [max(x, y)]


def test_no_single_link_chains():
    """Each image is 6 bits from the previous one, so each is near *a member*
    of the cluster; only those near the founding picture may join it."""
    index = ClusterIndex(phash_threshold=10)
    code = 0
    ids = []
    for step in range(8):
        code = _flip(code, range(step * 6, step * 6 + 6))
        ids.append(index.assign(_sha(100 + step), _fake(code)).cluster_id)
    first = ids[0]
    assert ids[1] == first  # 6 bits from the founder
    assert ids[2] != first  # 12 bits from the founder, though 6 from a member: not this picture
    assert ids[3] == ids[2]  # ... and founds its own, which the next one joins
    # old single-link behaviour would have put all eight in one cluster
    assert index.n_clusters >= 4


def test_a_larger_copy_becomes_a_representative_a_crop_does_not():
    pic = np.random.default_rng(3).integers(0, 255, (64, 64), dtype=np.uint8)
    full = Image.fromarray(pic).resize((400, 400), Image.Resampling.BICUBIC).convert("RGB")
    crop = full.crop((20, 20, 380, 380))  # the 90% centre crop
    index = ClusterIndex()
    c = index.assign(*_h(crop))
    grown = index.assign(*_h(full))
    assert not grown.new_cluster and grown.cluster_id == c.cluster_id and grown.representative
    again = index.assign(*_h(crop, 60))
    assert again.cluster_id == c.cluster_id and not again.representative


def test_two_indexes_fed_the_same_sequence_agree():
    rng = random.Random(5)
    seq = []
    base = [(rng.getrandbits(64), rng.getrandbits(256)) for _ in range(20)]
    for i in range(400):
        b, q = rng.choice(base)
        pdq = range(0, rng.randint(0, 40 if i % 2 else 20))
        seq.append((_sha(1000 + i), _both(_flip(b, rng.sample(range(64), rng.randint(0, 14))), pdq, q)))
    runs = []
    for _ in range(2):
        index = ClusterIndex()
        runs.append([index.assign(s, h).model_dump() for s, h in seq])
    assert runs[0] == runs[1]
    # the sequence exercised multi-cluster links (merges have their own tests)
    assert any(r["merged"] or r["declined"] for r in runs[0])


def test_rebuild_with_add_gives_same_lookups():
    index = ClusterIndex()
    rng = random.Random(9)
    seq = [(_sha(i), _fake(rng.getrandbits(64))) for i in range(50)]
    for s, h in seq:
        index.assign(s, h)
    replica = ClusterIndex()
    for s, h in seq:
        cid = index.cluster_of(s)
        replica.add(cid, s, h, representative=cid == cluster_id_for(s))
    probe = _fake(_flip(int(seq[7][1].phash, 16), range(3)))
    assert replica.lookup("x", probe) == index.lookup("x", probe)
    assert replica.lookup("x", probe)[0].cluster_id == index.cluster_of(seq[7][0])


def test_low_quality_pdq_is_not_trusted():
    index = ClusterIndex()
    pdq = "ab" * 32
    index.assign(_sha(1), ImageHashes(phash="0" * 16, pdq=pdq, pdq_quality=20))
    probe = ImageHashes(phash="f" * 16, pdq=pdq, pdq_quality=90)  # pHash far, PDQ identical
    assert index.lookup(_sha(2), probe) == []
    index.assign(_sha(3), ImageHashes(phash="0f" * 8, pdq=pdq, pdq_quality=90))
    assert [m.via for m in index.lookup(_sha(2), probe)] == ["pdq"]


def test_eviction_returns_cold_clusters_and_forgets_them():
    index = ClusterIndex()
    a = index.assign(_sha(1), _fake(0), ts=100.0).cluster_id
    b = index.assign(_sha(2), _fake(2**64 - 1), ts=200.0).cluster_id
    assert index.evict_older_than(150.0) == [a]
    assert a not in index and b in index
    assert index.lookup(_sha(9), _fake(1)) == []
    assert index.assign(_sha(3), _fake(1)).new_cluster
    index.remove_cluster(b)
    assert index.n_clusters == 1 and index.n_members == 1


@pytest.mark.parametrize("nbits,radius", [(64, 10), (256, 31)])
def test_hamming_index_is_exact_through_inserts_deletes_and_compaction(nbits, radius):
    rng = np.random.default_rng(nbits)
    w = nbits // 64
    codes = rng.integers(0, 2**63, (6000, w), dtype=np.uint64)
    queries = codes[:40].copy()
    for i in range(40):  # perturb by 0..radius+2 bits
        for b in rng.choice(nbits, i % (radius + 3), replace=False):
            queries[i, b // 64] ^= np.uint64(1 << int(b % 64))
    index = HammingIndex(nbits, delta_max=1500, mih_min=2000)  # small sizes force main, mid and delta paths
    for lo in range(0, 6000, 500):
        index.add(np.arange(lo, lo + 500), codes[lo : lo + 500])
    assert len(index._segments) == 2 and index._n - index._main_n == 1000  # main, mid, and a delta
    index.remove(np.arange(0, 40, 3))
    qi, ids, d = index.search(queries, radius)
    brute = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(axis=2)
    alive = np.ones(6000, bool)
    alive[np.arange(0, 40, 3)] = False
    bq, bi = np.nonzero((brute <= radius) & alive)
    assert set(zip(qi.tolist(), ids.tolist())) == set(zip(bq.tolist(), bi.tolist()))
    assert (d == brute[qi, ids]).all()


def test_hamming_index_per_query_radius_is_exact():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2**63, (5000, 1), dtype=np.uint64)
    queries = codes[:30].copy()
    for i in range(30):
        for b in rng.choice(64, i % 13, replace=False):
            queries[i, 0] ^= np.uint64(1 << int(b))
    radii = np.array([10, 8, 5] * 10)
    index = HammingIndex(64, delta_max=1500, mih_min=2000)
    index.add(np.arange(5000), codes)
    qi, ids, d = index.search(queries, radii)
    brute = np.bitwise_count(queries[:, None, 0] ^ codes[None, :, 0])
    bq, bi = np.nonzero(brute <= radii[:, None])
    assert set(zip(qi.tolist(), ids.tolist())) == set(zip(bq.tolist(), bi.tolist()))


def test_single_inserts_below_the_mih_size_do_not_recompact(monkeypatch):
    # The cluster agent adds one member at a time; between delta_max and
    # mih_min each add used to trigger a full compaction.
    index = HammingIndex(64)
    calls = []
    real = index.compact
    monkeypatch.setattr(index, "compact", lambda: (calls.append(1), real())[1])
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**63, size=(20_000, 1), dtype=np.int64).astype(np.uint64)
    for i in range(len(codes)):
        index.add(np.array([i]), codes[i : i + 1])
    assert len(calls) <= 2
    _rows, ids, distances = index.search(codes[:5], 0)
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4] and not distances.any()  # and still exact


def test_framed_copies_of_different_pictures_do_not_match_on_the_frame(photos):
    """Screenshots share their frame (margins, bars): it must not glue two
    pictures together, while each screenshot still joins its own picture."""
    index = ClusterIndex()
    first, second = photos[0], photos[1]
    a = index.assign(*_h(screenshot(first)))
    b = index.assign(*_h(screenshot(second)))
    assert b.new_cluster and b.cluster_id != a.cluster_id
    assert index.assign(*_h(first)).cluster_id == a.cluster_id
    assert index.assign(*_h(second)).cluster_id == b.cluster_id


def test_caption_bars_join_their_picture(photos):
    """A bar over the bottom eighth, or bars top and bottom covering 1/6,
    leaves a band of the picture unchanged: the band views meet."""
    from bench.neardup_transforms import _bar

    joined = 0
    for img in photos[:6]:
        index = ClusterIndex()
        c = index.assign(*_h(img)).cluster_id
        bars = [_bar(img, 1 / 8, "bottom", text="BREAKING NEWS"), _bar(img, 1 / 6, "both", text="WHEN YOU SEE IT"),
                _bar(img, 1 / 6, "bottom", fill=(255, 255, 255), text="share before they delete it")]
        joined += sum(index.assign(*_h(b)).cluster_id == c for b in bars)
    assert joined >= 16, joined  # of 18
