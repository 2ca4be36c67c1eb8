"""The analyze stage's local reads and small pictures run on the event loop;
large pictures take one thread hop (``streams.stage``). Real fetcher, real
analyzer, real blob store; only the findings store is a stand-in."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from streams.analyze import Analyzer
from streams.blobstore import DirectoryBlobStore
from streams.fetch import ImageFetcher
from streams.findings import PostIdentity
from streams.records import ClusterOp, SourceRef
from streams.settings import Settings
from detectors.imagedata import MAX_GIF_STEPS, png_chunks_over
from streams.stage import MAX_INLINE_PNG_CHUNKS, AnalyzeStage
from tests.hostile import corpus


class _Store:
    """The findings store's answer to the duplicate check: what it holds."""

    def __init__(self):
        self.sightings: dict[str, PostIdentity] = {}

    def sighting_identity(self, event_id):
        return self.sightings.get(event_id)


def _event(n: int, path: str) -> bytes:
    return json.dumps({"event_id": f"e{n}", "platform": "x", "account_id": f"a{n}",
                       "posted_at": "2026-05-01T12:00:00Z", "image": {"path": path}}).encode()


def thread_hops(monkeypatch) -> list[str]:
    """The names of the functions sent to a thread (``asyncio.to_thread``) from now on."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def counting(fn, *args, **kwargs):
        hops.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return hops


@pytest.fixture
def setup(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    (images / "small.png").write_bytes(corpus.picture_png(1, (256, 192)))
    (images / "large.png").write_bytes(corpus.picture_png(2, (640, 480)))
    hops = thread_hops(monkeypatch)

    def make(inline_max_pixels: int, store_url: str = "", store: _Store | None = None):
        settings = Settings(data_dir=tmp_path / "data", ingest={"image_roots": [images]},
                            batch={"analyze_inline_max_pixels": inline_max_pixels}, findings={"url": store_url})
        blobs = DirectoryBlobStore(tmp_path / "blobs")
        puts: list[bytes] = []

        def put(data: bytes, sha256: str) -> str:
            puts.append(data)
            return blobs.put(data, sha256)

        fetcher = ImageFetcher(settings.fetch, settings.ingest, blobs)
        findings = store or _Store()
        stage = AnalyzeStage(settings, fetcher, Analyzer(settings, tmp_path / "blobs"), put, lambda: findings)
        return stage, puts

    return make, hops


def _run(stage: AnalyzeStage, events: list[bytes]):
    async def go():
        return [await stage.process(raw, SourceRef(topic="events", partition=0, offset=i)) for i, raw in enumerate(events)]
    return asyncio.run(go())


def test_a_small_local_picture_takes_no_thread_hop_and_a_large_one_takes_one(setup):
    make, hops = setup
    stage, _ = make(200_000)  # 256x192 is under it, 640x480 over
    small, large = _run(stage, [_event(0, "small.png"), _event(1, "large.png")])
    assert ClusterOp.loads(small.op).sighting.width == 256
    assert ClusterOp.loads(large.op).sighting.width == 640
    assert hops == ["_blocking"]  # the large picture's analysis only; no hop for either read


def _with_text_chunks(png: bytes, n: int, *, after_pixels: bool = False) -> bytes:
    chunks = b"".join(struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
                      for body in (b"k%d\0v" % i for i in range(n)))
    at = len(png) - 12 if after_pixels else 33  # before IEND, or after IHDR
    return png[:at] + chunks + png[at:]


@pytest.mark.parametrize("after_pixels", [False, True])
def test_a_small_png_of_100000_text_chunks_is_analysed_in_a_thread(setup, after_pixels):
    """Pillow handles each chunk in Python, opening and decoding: 2 MB of
    tiny tEXt chunks in a 256x192 picture held the loop ~1 s, where no
    deadline reaches. It is analysed in a thread; the same picture with 20
    text chunks stays on the loop."""
    make, hops = setup
    stage, _ = make(4_000_000)
    images = stage.settings.ingest.image_roots[0]
    plain = (images / "small.png").read_bytes()
    chunky = _with_text_chunks(plain, 100_000, after_pixels=after_pixels)
    assert len(chunky) < 4_000_000  # under the byte cap and the pixel cap alike
    (images / "chunky.png").write_bytes(chunky)
    (images / "some-text.png").write_bytes(_with_text_chunks(plain, 20, after_pixels=after_pixels))
    chunky_result, some_text = _run(stage, [_event(0, "chunky.png"), _event(1, "some-text.png")])
    assert ClusterOp.loads(chunky_result.op).sighting.width == 256
    assert some_text.op is not None
    assert hops == ["_blocking"]


def test_a_small_gif_padded_with_comment_blocks_is_refused_in_a_thread_not_opened_on_the_loop(setup):
    """Pillow walks (and keeps) every comment sub-block before a GIF's first
    picture when it opens the file: a 3.7 MB one held the loop 0.57 s and
    150 MB before the decoder refused it. The header is judged by the
    decoder's own structure check, so it goes to the thread, refused there."""
    make, hops = setup
    stage, _ = make(4_000_000)
    images = stage.settings.ingest.image_roots[0]
    buf = io.BytesIO()
    Image.open(io.BytesIO(corpus.picture_png(2, (16, 12)))).convert("P").save(buf, "GIF")
    gif = buf.getvalue()
    flags = gif[10]
    at = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # after the global colour table
    padded = gif[:at] + b"\x21\xfe" + b"\x01a" * (MAX_GIF_STEPS + 10) + b"\x00" + gif[at:]
    (images / "padded.gif").write_bytes(padded)
    [r] = _run(stage, [_event(0, "padded.gif")])
    assert r.op is None and r.dead.reason == "too_many_segments"
    assert hops == ["_blocking"]


def test_png_chunks_are_counted_no_further_than_the_limit():
    png = corpus.picture_png(1, (64, 48))
    assert not png_chunks_over(png, MAX_INLINE_PNG_CHUNKS)
    assert not png_chunks_over(b"\xff\xd8\xff" + bytes(100), 0)  # not a PNG
    assert png_chunks_over(_with_text_chunks(png, MAX_INLINE_PNG_CHUNKS), MAX_INLINE_PNG_CHUNKS)
    assert not png_chunks_over(_with_text_chunks(png, 10), MAX_INLINE_PNG_CHUNKS)
    assert not png_chunks_over(png + _with_text_chunks(b"", 5_000), 100)  # past IEND: never read


@pytest.mark.parametrize("change, reason", [
    ({"schema_version": True}, "unsupported_version"),
    ({"engagement": {"likes": "5"}}, "schema_violation"),
    ({"engagement": {"likes": True}}, "schema_violation"),
])
def test_a_value_the_published_schema_refuses_is_a_validate_dead_letter_not_a_sighting(setup, change, reason):
    make, _ = setup
    stage, _ = make(4_000_000)
    [r] = _run(stage, [json.dumps({**json.loads(_event(0, "small.png")), **change}).encode()])
    assert r.op is None and (r.dead.stage, r.dead.reason) == ("validate", reason) and r.dead.event_id == "e0"


def test_inline_off_means_one_hop_per_event(setup):
    make, hops = setup
    stage, _ = make(0)
    results = _run(stage, [_event(0, "small.png"), _event(1, "small.png")])
    assert all(r.op is not None for r in results) and hops == ["_blocking", "_blocking"]


def test_with_elasticsearch_an_event_id_lookup_never_runs_on_the_loop(setup):
    # Looking an event id up in Elasticsearch is a network round trip: it takes the thread hop even for a
    # small picture, and for an id this worker sent moments ago (the store is asked about every id).
    make, hops = setup
    stage, _ = make(4_000_000, "https://es.example:9200")
    first, again = _run(stage, [_event(0, "small.png"), _event(0, "small.png")])
    assert first.op is not None and again.op is not None  # not stored yet: the cluster engine recognises it
    assert hops == ["_blocking", "_blocking"]


def test_a_resend_the_store_holds_is_a_duplicate_though_this_worker_sent_it(setup):
    """The worker's memory of ids it sent is kept by count, the cluster
    engine's by an hour of event time: a resend the store already holds is a
    duplicate here, however long ago this worker sent it (before, it went to
    the engine, which counted it again once past its window)."""
    make, _ = setup
    store = _Store()
    stage, _ = make(4_000_000, store=store)
    [first] = _run(stage, [_event(0, "small.png")])
    s = ClusterOp.loads(first.op).sighting
    store.sightings["e0"] = PostIdentity(s.sha256, s.event.platform, s.event.account_id)  # the sinks stored it
    [again] = _run(stage, [_event(0, "small.png")])
    assert again.duplicate and again.op is None and again.dead is None
    [other] = _run(stage, [_event(0, "large.png")])  # the same id with another picture
    assert other.dead is not None and other.dead.reason == "conflict"


def test_a_missing_local_file_is_a_fetch_dead_letter(setup):
    make, _ = setup
    stage, _ = make(4_000_000)
    [r] = _run(stage, [_event(0, "nope.png")])
    assert r.op is None and (r.dead.stage, r.dead.reason) == ("fetch", "not_found") and r.dead.event_id == "e0"


def test_a_repeated_picture_is_put_in_the_blob_store_once(setup):
    make, _ = setup
    stage, puts = make(4_000_000)
    results = _run(stage, [_event(n, "small.png") for n in range(3)] + [_event(3, "large.png")])
    assert all(r.op is not None for r in results)
    assert len(puts) == 2


def test_a_repeated_picture_is_analysed_once_and_read_back_from_memory(setup, monkeypatch):
    """Reposts of the same bytes reuse the first analysis: hashed once, and
    read back from memory, not from the on-disk cache (removed here)."""
    import streams.analyze as analyze

    make, _ = setup
    stage, _ = make(4_000_000)
    calls = []
    real = analyze.compute_hashes
    monkeypatch.setattr(analyze, "compute_hashes", lambda image: calls.append(image.sha256) or real(image))
    [first] = _run(stage, [_event(0, "small.png")])
    cached = list((stage.analyzer._blob_root / analyze.ANALYSIS_DIR).glob("*.json"))
    assert len(cached) == 1 and f".h{analyze.HASHES_VERSION}." in cached[0].name
    cached[0].unlink()
    again = _run(stage, [_event(n, "small.png") for n in range(1, 4)])
    assert len(calls) == 1
    hashes = {ClusterOp.loads(r.op).sighting.hashes.model_dump_json() for r in [first, *again]}
    assert len(hashes) == 1


def test_a_repost_of_a_large_picture_stays_on_the_loop_and_is_not_opened_again(setup, monkeypatch):
    """A large picture takes its thread hop once; its reposts (same bytes,
    moments later) cost a digest and a lookup on the loop: no hop, no decode,
    not even a header parse, and the same sighting facts."""
    import streams.analyze as analyze

    import io

    from PIL import Image

    make, hops = setup
    stage, _ = make(200_000)  # 640x480 is over it; its bytes (a smooth JPEG, a few kB) are not
    smooth = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    buf = io.BytesIO()
    smooth.save(buf, "JPEG", quality=90)
    assert len(buf.getvalue()) < 200_000
    (stage.settings.ingest.image_roots[0] / "large.jpg").write_bytes(buf.getvalue())
    opened = []
    real = analyze.ImageData
    monkeypatch.setattr(analyze, "ImageData", lambda data, **kw: opened.append(1) or real(data, **kw))
    results = _run(stage, [_event(n, "large.jpg") for n in range(3)])
    assert hops == ["_blocking"] and len(opened) == 1
    sightings = [ClusterOp.loads(r.op).sighting for r in results]
    assert {(s.sha256, s.width, s.height, s.format, s.hashes.model_dump_json()) for s in sightings}.__len__() == 1
    assert [s.event.event_id for s in sightings] == ["e0", "e1", "e2"]


def test_recorded_hashes_come_from_the_analysis_kept_or_else_the_blob(tmp_path):
    """Readers of the findings store (the desk, `deepwatch similar`) get an
    image's whole hash record: the one the analyze stage kept, without
    decoding anything, or else hashed again from its blob-store bytes."""
    import io

    import streams.analyze as analyze
    from detectors.hashing import compute_hashes
    from detectors.imagedata import ImageData
    from streams.blobstore import DirectoryBlobStore
    from tests.support import picture

    settings = Settings(data_dir=tmp_path)
    analyzer = analyze.Analyzer(settings, tmp_path / "blobs")
    jpegs = []
    for seed in (1, 2):
        buf = io.BytesIO()
        picture(seed, (200, 150)).save(buf, "JPEG", quality=85)
        jpegs.append(buf.getvalue())
    kept = analyzer._analyse(jpegs[0], ImageData(jpegs[0]).sha256).hashes  # analysed, its bytes never stored
    assert analyze.recorded_hashes(settings, ImageData(jpegs[0]).sha256) == kept and kept.thumb
    sha = DirectoryBlobStore(tmp_path / "blobs").put(jpegs[1])  # stored, never analysed
    assert analyze.recorded_hashes(settings, sha) == compute_hashes(ImageData(jpegs[1]))
    assert analyze.recorded_hashes(settings, "0" * 64) is None


def test_a_blob_store_that_cannot_write_names_itself_not_the_decoder(setup, tmp_path):
    # A full disk (EFBIG under `ulimit -f`) read "decode:internal_error OSError:
    # [Errno 27] File too large", naming neither the blob store nor a path.
    import errno
    from unittest import mock

    make, _ = setup
    stage, _ = make(4_000_000)
    with mock.patch("streams.blobstore.write_atomically", side_effect=OSError(errno.EFBIG, "File too large")):
        [result] = _run(stage, [_event(0, "small.png")])
    dead = result.dead
    assert (dead.stage, dead.reason) == ("blob", "blob_write")
    assert "File too large" in dead.detail and str(tmp_path / "blobs") in dead.detail and "disk space" in dead.detail


def test_a_sighting_says_whether_the_banks_were_asked(tmp_path):
    # the cluster engine lets a sighting's bank items replace (or clear) the cluster's for its bytes only then
    import io

    import streams.analyze as analyze
    from streams.records import ImageEvent
    from tests.support import picture

    buf = io.BytesIO()
    picture(3, (200, 150)).save(buf, "JPEG", quality=85)
    data = buf.getvalue()
    event = ImageEvent.model_validate({"event_id": "e1", "platform": "x", "account_id": "a",
                                       "posted_at": "2026-12-01T10:00:00Z", "image": {"url": "https://img.example/1.jpg"}})
    settings = Settings(data_dir=tmp_path)
    source = SourceRef(topic="events", partition=0, offset=0)
    assert analyze.Analyzer(settings, tmp_path / "blobs").analyze(event, data, source).banks_checked is False
    (tmp_path / "pic.jpg").write_bytes(data)
    bank = settings.bank_store()
    bank.add_images("factcheck", "fake", [tmp_path / "pic.jpg"])
    bank.close()
    seen = analyze.Analyzer(settings, tmp_path / "blobs").analyze(event, data, source)
    assert seen.banks_checked is True and [e.detector for e in seen.evidence if e.kind == "bank"] == ["bank:factcheck"]
