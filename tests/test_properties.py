"""Property-based tests: whatever the input, each boundary raises only its own
error type (the one the analyze stage turns into a dead letter with a
reason) or succeeds. Hypothesis searches for the input that breaks this."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image

from detectors.hashing import compute_hashes
from detectors.imagedata import DecodeLimits, ImageData, ImageRejected
from streams.fetch import ImageFetcher
from streams.records import ImageEvent
from streams.safe_http import FetchError
from streams.settings import FetchSettings, IngestSettings
from streams.validate import InvalidEvent, event_id_of, parse_event

GOOD = {"event_id": "e-1", "platform": "x", "account_id": "a-1", "posted_at": "2026-05-01T12:00:00Z",
        "image": {"url": "https://example.com/a.jpg"}}

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


# -- event parsing ------------------------------------------------------------
@PROFILE
@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_are_invalid(raw):
    try:
        parse_event(raw)
    except InvalidEvent as e:
        assert e.reason and e.detail
    event_id_of(raw)  # never raises


@PROFILE
@given(st.sampled_from(sorted(GOOD)), json_values, st.dictionaries(st.text(max_size=12), json_values, max_size=3))
def test_mutated_events_parse_or_are_invalid(field, value, extra):
    doc = {**extra, **GOOD, field: value}
    raw = json.dumps(doc).encode()
    try:
        ev = parse_event(raw)
    except InvalidEvent as e:
        assert e.reason in ("malformed_json", "schema_violation", "unsupported_version", "too_large")
        return
    ev.dumps().decode("utf-8")  # whatever was accepted can be sent on


@PROFILE
@given(st.text(max_size=60))
def test_event_ids_from_any_text(eid):
    raw = json.dumps({**GOOD, "event_id": eid}).encode()
    try:
        assert parse_event(raw).event_id == eid
    except InvalidEvent:
        pass
    got = event_id_of(raw)
    assert got is None or got == eid


# -- URL and path handling ----------------------------------------------------
@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Every name "resolves" to a private address, so the fetcher refuses it
    # before connecting: the properties run without touching the network.
    def fake_getaddrinfo(host, port, *args, **kw):
        if "\x00" in host:
            raise ValueError("embedded null")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port or 80))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)


def _fetch(image: dict, ingest: IngestSettings | None = None) -> None:
    try:
        ev = ImageEvent.model_validate({**GOOD, "image": image})
    except ValueError:
        assume(False)
        return

    async def go() -> None:
        f = ImageFetcher(FetchSettings(retries=0, total_timeout_s=5), ingest or IngestSettings())
        try:
            await f.get(ev)
        finally:
            await f.aclose()

    try:
        asyncio.run(go())
    except FetchError as e:
        assert e.reason and e.detail


url_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)


@PROFILE
@given(st.sampled_from(["http://", "https://", "HTTP://"]), url_text)
def test_any_url_is_fetched_or_refused_with_a_reason(scheme, rest):
    _fetch({"url": scheme + rest})


@PROFILE
@given(st.from_regex(r"https?://\[?[0-9a-fA-F:.%\]\[]{0,40}(:[0-9]{0,7})?/[ -~]{0,20}", fullmatch=True))
def test_bracketed_hosts_and_ports(url):
    _fetch({"url": url})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300))
def test_any_path_is_read_or_refused_with_a_reason(tmp_path, path):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    _fetch({"path": path}, IngestSettings(image_roots=[root]))


# -- image decoding -------------------------------------------------------------
def _seed_images() -> list[bytes]:
    out = []
    for fmt, mode in (("PNG", "RGBA"), ("GIF", "P"), ("JPEG", "RGB"), ("BMP", "RGB"), ("TIFF", "RGB"), ("WEBP", "RGB")):
        buf = io.BytesIO()
        Image.new(mode, (24, 16)).save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()
SMALL = DecodeLimits(max_pixels=4_000_000, max_decode_bytes=32 << 20)


def _decode(data: bytes) -> None:
    try:
        image = ImageData(data, limits=SMALL)
        compute_hashes(image)
        image.pixels("RGBA", oriented=False)
    except ImageRejected as e:
        assert e.reason


@PROFILE
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       st.integers(0, 10_000))
def test_corrupted_images_decode_or_are_rejected(seed, flips, cut):
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    _decode(bytes(data[: max(1, len(data) - cut % len(data))]))


@PROFILE
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"BM", b"II*\x00", b"RIFF"]),
       st.binary(max_size=400))
def test_random_bodies_behind_image_magic(magic, body):
    _decode(magic + body)


# -- fusion -------------------------------------------------------------------
def _evidence():
    from detectors.base import Evidence, EvidenceKind

    # few detectors, so several items per detector (rule 2) and exact ties are common;
    # 0.25 / 0.75 at one weight contribute exactly +-log(3)
    scores = st.sampled_from([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]) | st.floats(0.0, 1.0)
    weights = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 1e308]) | st.floats(0.0, 1e308)
    return st.builds(Evidence, detector=st.sampled_from(["c2pa", "model:a", "vendor:v", "bank:b", "xmp"]),
                     kind=st.sampled_from(list(EvidenceKind)), score=scores, weight=weights,
                     detail=st.sampled_from(["one", "two"]), sha256=st.none() | st.sampled_from(["a" * 64, "b" * 64]),
                     data=st.sampled_from([{}, {"verdict": "authentic"}, {"verdict": "fake"}, {"post": 1}]))


@PROFILE
@given(st.lists(_evidence(), max_size=8).flatmap(lambda evs: st.tuples(st.just(evs), st.permutations(evs))))
def test_fusion_is_invariant_under_permutation_of_its_input(pair):
    """Fusion is a function of the set of evidence: a merged cluster's verdict
    must not depend on which side of the merge survived (whose evidence came
    first), nor on the order sightings arrived in."""
    import math

    from detectors.fusion import fuse

    evidence, shuffled = pair
    fused, again = fuse(evidence), fuse(list(shuffled))
    assert fused == again  # score, verdict and the kept items in their order
    assert math.isfinite(fused.score) and 0.0 <= fused.score <= 1.0
