"""Hostile input and operator mistakes, one test per defect class of issue 7.

Every test here failed on the code before the fix (a crash, a hang, a silent
loss or a silent success); the pipeline-level drill is test_hostile_pipeline.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import json
import os
import shutil
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from detectors.imagedata import DecodeLimits, ImageData, ImageRejected, process_budget
from streams.fetch import ImageFetcher
from streams.findings import PostIdentity
from streams.records import DeadLetter, ImageEvent, SourceRef
from streams.safe_http import FetchError, public_address
from streams.settings import FetchSettings, IngestSettings, Settings
from streams.stage import AnalyzeStage
from streams.validate import MAX_EVENT_BYTES, InvalidEvent, event_id_of, parse_event
from tests.hostile import corpus
from tests.support import slow_drip_url

GOOD = {"event_id": "e-1", "platform": "x", "account_id": "a-1", "posted_at": "2026-05-01T12:00:00Z",
        "image": {"url": "https://example.com/a.jpg"}}


def _invalid(raw: bytes) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    return info.value


# -- event parsing ------------------------------------------------------------
def test_json_nested_5000_deep_is_a_dead_letter_not_a_recursion_error():
    assert _invalid(b"[" * 5000 + b"]" * 5000).reason == "malformed_json"
    assert _invalid(b'{"a":' * 5000 + b"1" + b"}" * 5000).reason == "malformed_json"
    assert event_id_of(b"[" * 100_000) is None  # ingest's look at the id never raises either


def test_5000_digit_integer_is_malformed_json():
    raw = json.dumps(GOOD).replace('"platform"', '"n": ' + "9" * 5000 + ', "platform"').encode()
    assert _invalid(raw).reason == "malformed_json"
    huge = json.dumps({**GOOD, "engagement": {"likes": 10**20}}).encode()
    assert _invalid(huge).reason == "schema_violation"  # representable, but beyond any real count


def test_lone_surrogate_in_event_id():
    raw = json.dumps({**GOOD, "event_id": "a\ud800b"}).encode()
    err = _invalid(raw)
    assert err.reason == "malformed_json" and err.event_id is None
    assert event_id_of(raw) is None
    dl = DeadLetter(event_id="a\ud800b", stage="validate", reason=err.reason, detail="x\udfff")
    dl.dumps().decode("utf-8")  # the dead letter itself always encodes


def test_600kb_event_id_and_its_dead_letter_stay_small():
    raw = json.dumps({**GOOD, "event_id": "x" * 600_000}).encode()
    err = _invalid(raw)
    assert err.reason == "schema_violation" and err.event_id is None
    dl = DeadLetter(event_id="x" * 600_000, stage="validate", reason="r" * 1000, detail="d" * 900_000,
                    payload_excerpt=raw.decode())
    assert len(dl.dumps()) < 4000


def test_event_near_one_megabyte_is_bounded_before_it_reaches_a_topic():
    doc = {**GOOD, "text": "spam " * 150_000, "hashtags": ["t"] * 10}
    ev = parse_event(json.dumps(doc).encode())
    assert len(ev.text) <= 10_000  # truncated, not refused: the sighting still counts
    assert len(ev.dumps()) < 64_000
    assert _invalid(json.dumps({**GOOD, "hashtags": ["x" * 300_000]}).encode()).reason == "schema_violation"
    assert _invalid(b" " * (MAX_EVENT_BYTES + 1)).reason == "too_large"


def test_unknown_top_level_field_is_kept_out_and_version_still_checked():
    assert parse_event(json.dumps({**GOOD, "new_thing": [1, 2]}).encode()).event_id == "e-1"
    assert _invalid(json.dumps({**GOOD, "schema_version": 2}).encode()).reason == "unsupported_version"


# -- URL and path handling ----------------------------------------------------
def _event(**image) -> ImageEvent:
    return ImageEvent.model_validate({**GOOD, "image": image})


def _fetch(event: ImageEvent, fetch: FetchSettings | None = None, ingest: IngestSettings | None = None) -> bytes:
    async def go() -> bytes:
        f = ImageFetcher(fetch or FetchSettings(retries=0), ingest or IngestSettings())
        try:
            return await f.get(event)
        finally:
            await f.aclose()

    return asyncio.run(go())


def _fetch_fails(event: ImageEvent, **kw) -> FetchError:
    with pytest.raises(FetchError) as info:
        _fetch(event, **kw)
    return info.value


@pytest.mark.parametrize("url", ["http://example.com:99999/a.jpg", "http://[::1/x", "http://exa\u0000mple.com/a",
                                 "http://[fe80::1%25eth0/x", "https://" + "a" * 300 + ".com/x"])
def test_malformed_urls_are_bad_url_not_a_crash(url):
    err = _fetch_fails(_event(url=url))
    assert err.reason in ("bad_url", "dns_failure", "blocked_address")


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "ok.png").write_bytes(corpus.picture_png(1, (32, 32)))
    return r


@pytest.mark.parametrize("name", ["a\x00b.png", "n" * 300 + ".png", "../" * 40 + "x.png"])
def test_hostile_path_names_are_fetch_errors(root, name):
    err = _fetch_fails(_event(path=name), ingest=IngestSettings(image_roots=[root]))
    assert err.reason in ("bad_path", "path_not_allowed", "not_found")


def test_symlink_loop_is_bad_path(root):
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    assert _fetch_fails(_event(path="a/x.png"), ingest=IngestSettings(image_roots=[root])).reason == "bad_path"


def test_fifo_in_image_root_does_not_block(root):
    os.mkfifo(root / "pipe.png")
    result: dict = {}

    def go() -> None:
        try:
            _fetch(_event(path="pipe.png"), ingest=IngestSettings(image_roots=[root]))
        except FetchError as e:
            result["err"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a FIFO blocked the fetch thread"
    assert result["err"].reason == "not_a_file"


@pytest.fixture
def drip_server():
    with slow_drip_url() as url:
        yield url


def test_slow_drip_server_hits_the_overall_fetch_deadline(drip_server):
    cfg = FetchSettings(allow_private_networks=True, retries=0, read_timeout_s=5, total_timeout_s=2)
    started = time.monotonic()
    err = _fetch_fails(_event(url=drip_server), fetch=cfg)
    assert err.reason == "timeout" and "total_timeout_s" in err.detail
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("addr", [
    "fec0::1",  # site-local (deprecated, but still routed inside some networks): was allowed
    "feff:ffff::1",  # the top of fec0::/10
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254 (cloud metadata)
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata service
    "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
    "::ffff:10.0.0.1",
])
def test_ipv6_addresses_embedding_internal_ipv4_are_refused(addr):
    assert not public_address(ipaddress.ip_address(addr))


def test_public_addresses_still_pass():
    for addr in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "2002:5db8:d822::1", "64:ff9b::5db8:d822"):
        assert public_address(ipaddress.ip_address(addr)), addr


def test_dns_answer_with_embedded_loopback_is_blocked(monkeypatch):
    def fake_getaddrinfo(host, port, *args, **kw):
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("64:ff9b::7f00:1", port, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert _fetch_fails(_event(url="http://innocent.example/a.png")).reason == "blocked_address"


def test_a_resolver_that_never_answers_is_given_up_on(monkeypatch):
    # The connectors' and ingest endpoint's URL policy resolved with no
    # deadline: a resolver that hung held the stream (or the request) for as
    # long as the system resolver's retries took.
    from streams.connectors.base import UrlPolicy
    from streams.safe_http import FetchError, resolve_checked
    from streams.settings import Settings

    released = threading.Event()

    def hung_getaddrinfo(host, port, *args, **kw):
        released.wait(3600)
        raise socket.gaierror("released")

    monkeypatch.setattr(socket, "getaddrinfo", hung_getaddrinfo)

    async def main():
        started = time.monotonic()
        with pytest.raises(FetchError) as e:
            await resolve_checked("slow.example", 443, False, timeout_s=0.2)
        assert e.value.reason == "dns_failure" and e.value.retryable and "0.2s" in e.value.detail
        policy = UrlPolicy(Settings().fetch, dns_timeout_s=0.2)
        assert await policy.check("https://slow.example/a.jpg") is None  # no verdict: the fetch stage checks again
        return time.monotonic() - started

    try:
        assert asyncio.run(main()) < 2.0
    finally:
        released.set()  # the DNS threads the hung lookups hold


def test_the_url_policy_reads_a_url_as_the_fetcher_sends_it(monkeypatch):
    """The policy (connectors, the ingest endpoint) and the fetcher's host
    breaker parsed URLs with ``urlsplit``, the request with httpx: a tab in
    the host was dropped by one (a lookup of "images.example.org.evil", no
    verdict, the event accepted) and refused by the other (a ``bad_url``
    dead letter only at the fetch stage). Both read ``safe_http.target`` now."""
    from streams.connectors.base import UrlPolicy

    looked_up = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or [])
    policy = UrlPolicy(Settings().fetch, dns_timeout_s=0.2)
    err = asyncio.run(policy.check("http://images.example.org\t.evil/x.jpg"))
    assert err is not None and err.reason == "bad_url" and looked_up == []
    async def fetch():
        fetcher = ImageFetcher(Settings().fetch, IngestSettings())
        try:
            await fetcher._url("http://images.example.org\t.evil/x.jpg")
        finally:
            await fetcher.aclose()

    with pytest.raises(FetchError) as fetched:
        asyncio.run(fetch())
    assert fetched.value.reason == "bad_url" and looked_up == []
    # one key per host and port, however the URL spells them (the policy's cache, the ingest endpoint's checks)
    assert {UrlPolicy.key(u) for u in ("https://Images.Example.org/a", "http://images.example.org:443/b",
                                       "https://user@images.example.org:443/c#d")} == {"images.example.org:443"}
    assert UrlPolicy.key("ftp://images.example.org/x") == "ftp://images.example.org/x"  # no host it would contact


# -- image decoding -------------------------------------------------------------
def test_43_byte_gif_with_96_mp_canvas_is_refused_before_decoding():
    data = corpus.gif_canvas_bomb()
    assert len(data) < 64
    with pytest.raises(ImageRejected) as e:
        ImageData(data)
    assert e.value.reason == "memory_budget" and "decode.max_decode_mb" in str(e.value)


def test_small_rgba_png_costing_gigabytes_is_refused_before_decoding():
    data = corpus.rgba_png_bomb()
    assert len(data) < 400_000
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as e:
        ImageData(data)
    assert e.value.reason == "memory_budget"
    assert time.perf_counter() - started < 1.0


def test_large_jpeg_over_budget_is_decoded_reduced_and_says_so():
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(buf, "JPEG")
    image = ImageData(buf.getvalue(), limits=DecodeLimits(max_decode_bytes=10 << 20))
    assert image.rgb.size[0] <= 2000 and image.decode_cost <= 10 << 20
    assert any("1/2 scale" in n or "1/4 scale" in n for n in image.notes)


def test_png_padded_with_a_50mb_ztxt_chunk_is_still_analysed():
    data = corpus.ztxt_padded_png(mb=50)
    image = ImageData(data)
    assert image.rgb.size == (256, 192)  # the pixels were read
    assert any("zTXt" in n for n in image.notes)
    assert image.sha256 == __import__("hashlib").sha256(data).hexdigest()  # identity is the bytes as sent


def test_decode_budget_serialises_large_decodes():
    budget = process_budget(1000)
    order = []

    def hold(tag: str) -> None:
        with budget.reserve(800):
            order.append(f"{tag}+")
            time.sleep(0.2)
            order.append(f"{tag}-")

    threads = [threading.Thread(target=hold, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert order[1].endswith("-") and order[3].endswith("-"), order  # never both held at once


# -- the analyze stage: one failure rule --------------------------------------
class _Fetcher:
    def __init__(self, data=None, exc=None, delay=0.0):
        self.data, self.exc, self.delay = data, exc, delay

    async def get(self, ev):
        await asyncio.sleep(self.delay)
        if self.exc:
            raise self.exc
        return self.data


class _Store:
    def __init__(self, known=None):
        self.known = known or {}
        self.marked = []

    def sighting_identity(self, event_id):
        return self.known.get(event_id)  # event id -> PostIdentity

    def mark_processed(self, source, outcome, event_id):
        self.marked.append((source, outcome, event_id))

    def close(self):
        pass


def _stage(tmp_path, fetcher, store=None, **ingest) -> AnalyzeStage:
    from streams.analyze import Analyzer

    settings = Settings(data_dir=tmp_path / "data", ingest=ingest)
    return AnalyzeStage(settings, fetcher, Analyzer(settings, tmp_path / "blobs"), lambda data, sha256: None,
                        lambda: store or _Store())


SRC = SourceRef(topic="t", partition=0, offset=1, run="r1")


def _raw(**over) -> bytes:
    return json.dumps({**GOOD, **over}).encode()


def test_any_unexpected_exception_becomes_a_dead_letter_with_its_stage(tmp_path):
    stage = _stage(tmp_path, _Fetcher(exc=ZeroDivisionError("boom")))
    r = asyncio.run(stage.process(_raw(), SRC))
    assert r.op is None and r.dead.stage == "fetch" and r.dead.reason == "internal_error"
    assert "ZeroDivisionError" in r.dead.detail and r.dead.source == SRC and r.dead.event_id == "e-1"


def test_per_event_deadline(tmp_path):
    stage = _stage(tmp_path, _Fetcher(delay=30), event_deadline_s=0.5)
    started = time.monotonic()
    r = asyncio.run(stage.process(_raw(), SRC))
    assert r.dead.reason == "deadline" and r.dead.stage == "fetch"
    assert time.monotonic() - started < 5


def test_future_posted_at_is_dead_lettered_with_the_setting_named(tmp_path):
    stage = _stage(tmp_path, _Fetcher(data=corpus.picture_png(1)))
    r = asyncio.run(stage.process(_raw(posted_at="9999-12-31T23:59:59Z"), SRC, time.time()))
    assert r.dead.stage == "validate" and r.dead.reason == "future_posted_at"
    assert "ingest.max_future_skew_s" in r.dead.detail
    near_future = datetime.now(timezone.utc).timestamp() + 60
    ok = asyncio.run(stage.process(_raw(posted_at=datetime.fromtimestamp(near_future, timezone.utc).isoformat()),
                                   SRC, time.time()))
    assert ok.op is not None  # clocks disagree by a minute all the time


def test_same_event_id_with_another_picture_is_a_conflict_naming_both(tmp_path):
    stage = _stage(tmp_path, _Fetcher(data=corpus.picture_png(1)))
    first = asyncio.run(stage.process(_raw(), SRC))
    assert first.op is not None
    stage.fetcher = _Fetcher(data=corpus.picture_png(2))
    second = asyncio.run(stage.process(_raw(), SRC))
    assert second.dead.reason == "conflict" and second.dead.stage == "dedupe"
    assert second.dead.detail.count("sha256:") == 2


def test_same_event_id_and_picture_from_another_account_is_a_conflict_an_edit_is_not(tmp_path):
    # Same picture, another platform and account under one id: dropped as a
    # repeat before (and the stream could keep the later post instead of the first).
    data = corpus.picture_png(1)
    stage = _stage(tmp_path, _Fetcher(data=data))
    first = asyncio.run(stage.process(_raw(), SRC))
    assert first.op is not None
    edited = asyncio.run(stage.process(_raw(text="edited caption", hashtags=["news"],
                                            engagement={"likes": 9}), SRC))
    assert edited.dead is None  # an edit or updated counts: the same post, judged a repeat downstream
    other = asyncio.run(stage.process(_raw(platform="mastodon", account_id="mallory"), SRC))
    assert (other.dead.stage, other.dead.reason) == ("dedupe", "conflict")
    assert "platform 'x' -> 'mastodon'; account_id 'a-1' -> 'mallory'" in other.dead.detail
    # ... and from the store, after a restart forgot what this worker sent
    store = _Store({"e-1": PostIdentity(hashlib.sha256(data).hexdigest(), "x", "a-1")})
    fresh = _stage(tmp_path, _Fetcher(data=data), store)
    assert asyncio.run(fresh.process(_raw(account_id="mallory"), SRC)).dead.reason == "conflict"
    assert asyncio.run(fresh.process(_raw(text="same post"), SRC)).duplicate
    # a sighting stored as "X" before platforms were stored in lower case: its resend is the same post
    upper = _Store({"e-1": PostIdentity(hashlib.sha256(data).hexdigest(), "X", "a-1")})
    assert asyncio.run(_stage(tmp_path, _Fetcher(data=data), upper).process(_raw(platform="X"), SRC)).duplicate


def test_different_events_failing_alike_are_different_dead_letters_the_same_message_one(tmp_path):
    from streams.findings import dead_letter_identity
    from streams.store import open_store

    stage = _stage(tmp_path, _Fetcher(data=corpus.picture_png(1)))
    same_id = [asyncio.run(stage.process(_raw(engagement={"likes": n}), SRC)).dead for n in (-1, -2, -1)]
    no_id = [asyncio.run(stage.process(b'{"pad": "' + b"z" * 600 + tail, SRC)).dead for tail in (b'", "a": 1}', b'", "b": 2}')]
    assert all(d.reason == "schema_violation" for d in same_id + no_id)
    keys = [dead_letter_identity(d) for d in same_id + no_id]
    assert keys[0] == keys[2] and len(set(keys)) == 4  # the same bytes again (a resend) are the same dead letter
    store = open_store(tmp_path / "findings")
    assert store.add_dead_letters(same_id + no_id) == 4
    assert store.add_dead_letters(same_id) == 0  # a replay adds nothing
    assert len(store.dead_letters()) == 4
    store.close()


def test_redelivered_event_already_in_the_store_is_not_counted_again(tmp_path):
    data = corpus.picture_png(3)
    store = _Store({"e-1": PostIdentity(hashlib.sha256(data).hexdigest(), "x", "a-1")})
    stage = _stage(tmp_path, _Fetcher(data=data), store)
    r = asyncio.run(stage.process(_raw(), SRC))
    assert r.duplicate and r.op is None and r.dead is None  # however long ago it was stored
    stage.mark_duplicate(SRC, r.event_id)
    assert store.marked == [(SRC, "duplicate", "e-1")]


def test_cluster_op_always_fits_in_a_broker_message(tmp_path):
    stage = _stage(tmp_path, _Fetcher(data=corpus.picture_png(4)))
    r = asyncio.run(stage.process(_raw(text="\u0000" * 150_000, hashtags=["#" * 256] * 64,
                                       account_handle="h" * 256), SRC))
    assert r.op is not None and len(r.op) < 1_000_000


# -- settings -----------------------------------------------------------------
def test_unknown_env_var_names_the_closest_key(monkeypatch):
    from streams.settings import load_settings
    from streams.settings_check import SettingsError

    monkeypatch.setenv("DEEPWATCH_FETCH__IMAGE_ROOTS", '["/tmp"]')
    with pytest.raises(SettingsError, match="DEEPWATCH_INGEST__IMAGE_ROOTS"):
        load_settings()
    monkeypatch.delenv("DEEPWATCH_FETCH__IMAGE_ROOTS")
    monkeypatch.setenv("DEEPWATCH_PARTITION", "3")
    with pytest.raises(SettingsError, match="DEEPWATCH_PARTITIONS"):
        load_settings()


def test_unknown_toml_key_names_the_closest_key(tmp_path, monkeypatch):
    from streams.settings import load_settings
    from streams.settings_check import SettingsError

    cfg = tmp_path / "d.toml"
    cfg.write_text("[alerts]\nmin_fake_scor = 0.8\n")
    monkeypatch.setenv("DEEPWATCH_CONFIG", str(cfg))  # what --config does; undone after the test
    with pytest.raises(SettingsError, match="alerts.min_fake_score"):
        load_settings()


@pytest.mark.parametrize("text, expected", [
    ('brokr = "kafka://k:9092"\n', "unknown setting 'brokr' in .*did you mean 'broker'"),  # top level: was ignored
    ('broker = kafka://k:9092\n', "is not valid TOML"),  # was a tomllib traceback
    ('\ufeffpartitions = 3\n', "byte-order mark.*without BOM"),  # was "Invalid statement (at line 1, column 1)"
    (None, "does not exist"),  # DEEPWATCH_CONFIG naming no file: was ignored, defaults used
])
def test_a_settings_file_that_cannot_be_used_is_one_clear_error(tmp_path, monkeypatch, text, expected):
    from streams.settings import load_settings
    from streams.settings_check import SettingsError

    cfg = tmp_path / "d.toml"
    if text is not None:
        cfg.write_text(text)
    monkeypatch.setenv("DEEPWATCH_CONFIG", str(cfg))
    with pytest.raises(SettingsError, match=expected):
        load_settings()
    cfg.write_text('broker = "kafka://k:9092"\n[alerts]\nmin_fake_score = 0.8\n')
    assert load_settings().broker == "kafka://k:9092"


@pytest.mark.parametrize("name, value", [("DEEPWATCH_PARTITIONS", "0"), ("DEEPWATCH_FETCH__READ_TIMEOUT_S", "-1"),
                                         ("DEEPWATCH_ALERTS__MIN_FAKE_SCORE", "1.5"), ("DEEPWATCH_METRICS_PORT", "70000")])
def test_numbers_outside_their_range_are_settings_errors(monkeypatch, name, value):
    # partitions = 0 was a ZeroDivisionError traceback in the producer
    from streams.settings import load_settings
    from streams.settings_check import SettingsError

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match="invalid setting"):
        load_settings()


def test_secrets_and_known_extras_are_not_settings_errors(monkeypatch):
    from streams.settings import load_settings

    monkeypatch.setenv("DEEPWATCH_WEBHOOK_SECRET", "x")
    monkeypatch.setenv("DEEPWATCH_KAFKA_PASSWORD", "x")
    monkeypatch.setenv("DEEPWATCH_ALERTS__MIN_FAKE_SCORE", "0.8")
    assert load_settings().alerts.min_fake_score == 0.8


def test_sasl_ssl_options_for_managed_kafka(monkeypatch):
    from streams.broker import BrokerError, kafka_client_options

    s = Settings(kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u"})
    with pytest.raises(BrokerError, match="DEEPWATCH_KAFKA_PASSWORD"):
        kafka_client_options(s)
    monkeypatch.setenv("DEEPWATCH_KAFKA_PASSWORD", "pw")
    assert kafka_client_options(s) == {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                                       "sasl_plain_username": "u", "sasl_plain_password": "pw"}


def test_a_missing_tls_file_is_named_at_once(tmp_path):
    # kafka-python failed only at the TLS handshake: 15-20 s later, blamed on
    # kafka.security_protocol, never naming the missing CA file.
    from streams.broker import BrokerError, faust_credentials, kafka_client_options

    s = Settings(kafka={"security_protocol": "SSL", "ssl_cafile": str(tmp_path / "nope.pem")})
    for build in (kafka_client_options, faust_credentials):
        with pytest.raises(BrokerError, match=r"kafka.ssl_cafile '.*nope.pem' is not a readable file \(DEEPWATCH_KAFKA__SSL_CAFILE\)"):
            build(s)


def test_settings_reference_is_generated_and_committed():
    from streams.settings_check import reference_markdown, setting_paths

    doc = reference_markdown()
    for path, _ in setting_paths():
        assert f"`{path}`" in doc
    committed = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert committed.read_text() == doc, "run `deepwatch settings --out docs/settings.md`"


# -- broker addresses ---------------------------------------------------------
@pytest.mark.parametrize("url", ["kafka://h:99999", "kafka://h", "http://h:9092", "kafka://"])
def test_bad_broker_urls_say_what_is_wrong(url):
    from streams.broker import BrokerError, bootstrap_of

    with pytest.raises(BrokerError):
        bootstrap_of(url)


def test_unreachable_broker_fails_fast_with_the_address():
    from streams.broker import BrokerError, check_reachable, free_port

    port = free_port()
    started = time.monotonic()
    with pytest.raises(BrokerError, match=f"127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (a TLS listener
    dialled in plaintext looks the same to a Kafka client)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield server.getsockname()[1]
    stop.set()
    t.join()
    for c in held:
        c.close()
    server.close()


def test_a_port_that_does_not_speak_kafka_is_a_clear_error_within_the_timeout(silent_port):
    # Was: kafka-python's own 30 s bootstrap wait per try, then a
    # KafkaTimeoutError traceback from `deepwatch worker`, `ingest` and `replay`.
    # Faust's producer waited 20 minutes for it, logging nothing (check_speaks_kafka).
    from streams.broker import BrokerError, check_speaks_kafka, ensure_topics, kafka_producer
    from streams.topics import topic_specs

    bootstrap = f"127.0.0.1:{silent_port}"
    for make in (lambda: ensure_topics(bootstrap, topic_specs(Settings()), timeout_s=2, settings=Settings()),
                 lambda: kafka_producer(bootstrap, Settings(), client_id="t", timeout_s=2),
                 lambda: check_speaks_kafka(bootstrap, Settings(), timeout_s=2)):
        started = time.monotonic()
        with pytest.raises(BrokerError, match=f"{bootstrap} accepts connections but did not answer as a Kafka broker"):
            make()
        assert time.monotonic() - started < 8


def test_every_kafka_client_applies_the_configured_security(monkeypatch, tmp_path):
    # The connectors' sink and the desk's alert producer built their clients
    # without kafka.security_protocol: a SASL cluster got plaintext. With the
    # password missing, each now stops at the settings check.
    from streams.broker import BrokerError
    from streams.connectors.sinks import KafkaSink
    from streams.desk.alerting import AlertPath
    from streams.records import Alert, Velocity

    monkeypatch.delenv("DEEPWATCH_KAFKA_PASSWORD", raising=False)
    settings = Settings(broker="kafka://127.0.0.1:1", data_dir=tmp_path,
                        kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"})
    with pytest.raises(BrokerError, match="DEEPWATCH_KAFKA_PASSWORD"):
        KafkaSink("127.0.0.1:1", settings)
    path = AlertPath(settings)
    alert = Alert(alert_id="c1:1", cluster_id="c1", rule="r", level=1, fake_score=0.9, verdict="likely-ai",
                  velocity=Velocity(sightings_5m=12), sightings=12, accounts=12, evidence=[],
                  at=datetime(2026, 5, 1, tzinfo=timezone.utc))
    try:
        with pytest.raises(BrokerError, match="DEEPWATCH_KAFKA_PASSWORD"):
            path._publish(alert)
    finally:
        path.close()


def test_topics_are_created_with_the_configured_replicas_and_a_refusal_is_one_error(tmp_path, monkeypatch):
    # Topics were always created with one replica: one lost broker lost events
    # and the cluster table's changelog, and managed Kafka refused them.
    from kafka import KafkaAdminClient
    from kafka.errors import InvalidReplicationFactorError

    from streams.broker import BrokerError, EmbeddedBroker, ensure_topics
    from streams.topics import topic_specs

    asked: list[dict] = []
    real_create = KafkaAdminClient.create_topics

    def create(self, new_topics, *a, **kw):
        asked.append(new_topics)
        if len(asked) > 1:  # what a three-broker-minimum cluster answers
            raise InvalidReplicationFactorError("Replication factor: 3 larger than available brokers: 1.")
        return real_create(self, new_topics, *a, **kw)

    monkeypatch.setattr(KafkaAdminClient, "create_topics", create)
    with EmbeddedBroker(tmp_path) as b:
        settings = Settings(topic_prefix="rf", kafka={"replication_factor": 3})
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        assert {v["replication_factor"] for v in asked[0].values()} == {3}
        assert any(v["configs"] == {"cleanup.policy": "compact"} for v in asked[0].values())
        other = Settings(topic_prefix="rf2", kafka={"replication_factor": 3})
        with pytest.raises(BrokerError, match="with 3 replica.*set kafka.replication_factor to at most"):
            ensure_topics(b.bootstrap, topic_specs(other), settings=other)


def test_connector_channels_confirm_only_their_own_sends(tmp_path):
    # Mastodon --hashtag streams shared one sink: a flush took every stream's
    # pending sends, so one stream's failure discarded another's unconfirmed
    # events, which that stream then checkpointed past. And the sink kept every
    # acknowledged offset of a connector running for days.
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.connectors.sinks import KafkaSink
    from streams.topics import topic_specs

    settings = Settings(topic_prefix="ch")
    with EmbeddedBroker(tmp_path) as b:
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        sink = KafkaSink(b.bootstrap, settings)
        one, two = sink.channel(), sink.channel()
        one.send_raw(b"a", b'{"n": 1}')
        two.send_raw(b"b", b'{"n": 2}')
        two.send_raw(b"c", b'{"n": 3}')
        assert (len(one.flush()), len(two.flush()), len(sink.flush())) == (1, 2, 0)
        assert not one.offsets and not sink.offsets  # nothing kept unless asked (keep_offsets)
        one.close()  # a channel leaves the shared producer open
        two.send_raw(b"d", b'{"n": 4}')
        assert len(two.flush()) == 1
        sink.close()


def test_embedded_broker_is_detected_behind_a_kafka_url(tmp_path):
    from streams.broker import EmbeddedBroker, check_speaks_kafka, faust_broker_url, free_port

    with EmbeddedBroker(tmp_path) as b:
        assert b.url.startswith("kafka://")
        check_speaks_kafka(f"127.0.0.1:{free_port()},{b.bootstrap}", Settings(), timeout_s=2)  # one answering is enough
        assert faust_broker_url(Settings(), b.url) == f"tansu://{b.bootstrap}"  # internal: the compat transport
        # any Kafka: the stock driver with safe commits (streams.safe_commits)
        assert faust_broker_url(Settings(kafka={"quirks": "none"}), b.url) == f"dwkafka://{b.bootstrap}"


def test_embedded_broker_leaves_no_temporary_log_dir_behind(monkeypatch):
    from streams import broker as broker_mod
    from streams.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        log_dir = b.log_path.parent
        assert log_dir.is_dir() and log_dir.name.startswith("deepwatch-broker-")
    assert not log_dir.exists()  # a clean stop removes the directory it made

    # a failed start keeps it: the error message points at the log
    monkeypatch.setattr(broker_mod, "_tansu_binary", lambda: "/bin/false")
    failing = EmbeddedBroker()
    with pytest.raises(RuntimeError, match="see .*tansu.log"):
        failing.start()
    assert failing.log_path.exists()
    shutil.rmtree(failing.log_path.parent)


def test_the_embedded_broker_moves_on_when_its_port_is_taken_before_it_binds(tmp_path):
    # free_port() lets the port go before the broker binds it. Whatever took it
    # meanwhile answered the "is it listening" probe, so the broker counted as
    # up on a port it never held (it had exited, unable to bind), and every
    # client then talked to the other program.
    from kafka import KafkaAdminClient

    from streams.broker import EmbeddedBroker

    b = EmbeddedBroker(tmp_path)
    squatter = socket.socket()
    squatter.bind((b.host, b.port))
    squatter.listen(8)
    taken = b.port
    try:
        with b:
            assert b.port != taken
            admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=10_000)
            try:
                assert admin.describe_cluster()["brokers"]
            finally:
                admin.close()
    finally:
        squatter.close()
    assert "AddrInUse" in (tmp_path / "tansu.log").read_text(errors="replace")


def test_ctrl_c_just_as_the_broker_process_is_created_stops_it(tmp_path, monkeypatch):
    import signal
    import subprocess

    from streams import broker as broker_mod
    from streams.broker import EmbeddedBroker

    created = []
    real_popen = subprocess.Popen

    def popen_then_ctrl_c(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        created.append(proc)
        os.kill(os.getpid(), signal.SIGINT)  # arrives before Popen has returned to the broker
        return proc

    monkeypatch.setattr(broker_mod.subprocess, "Popen", popen_then_ctrl_c)
    b = EmbeddedBroker(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        b.start()
    assert created and created[0].poll() is not None  # the broker it created was stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_endless_feed_line_is_never_held_whole(tmp_path):
    from streams.ingest import MAX_MESSAGE_BYTES, iter_lines

    feed = tmp_path / "feed.jsonl"
    with open(feed, "wb") as f:
        f.write(b'{"a": 1}\n\n')
        f.write(b"x" * (3 * MAX_MESSAGE_BYTES + 17) + b"\n")  # one line three times the limit
        f.write(b'{"b": 2}\n')
        f.write(b"y" * (MAX_MESSAGE_BYTES + 5))  # and one without a newline at the end
    got = list(iter_lines(feed))
    assert [len(line) for line in got] == [8, MAX_MESSAGE_BYTES + 1, 8, MAX_MESSAGE_BYTES + 1]
    assert got[0] == b'{"a": 1}' and got[2] == b'{"b": 2}'


def test_a_feed_line_padded_past_the_limit_is_refused_not_cut_down_to_its_event(tmp_path):
    """strip() ran after the line was cut at the limit: an event, a megabyte
    of blanks and more text was yielded as the event alone (accepted, the
    rest dropped). The limit is on the raw line, blanks included."""
    from streams.ingest import MAX_MESSAGE_BYTES, iter_lines
    from streams.validate import parse_event

    ev = json.dumps({"event_id": "e1", "platform": "x", "account_id": "a", "posted_at": "2024-01-01T00:00:00Z",
                     "image": {"url": "https://e.example/a.jpg"}}).encode()
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(ev + b" " * MAX_MESSAGE_BYTES + b'"junk"\n'  # over the limit
                     + b" " * (MAX_MESSAGE_BYTES + 3) + b"junk\n"  # blank up to the limit, then text
                     + ev + b"\r\n"  # within it
                     + b"x" * MAX_MESSAGE_BYTES + b"\r\n")  # at the limit, its CRLF cut by it
    got = list(iter_lines(feed))
    assert [len(line) for line in got] == [MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 1, len(ev), MAX_MESSAGE_BYTES]
    assert got[0].startswith(ev + b" ") and got[2] == ev
    with pytest.raises(InvalidEvent) as e:
        parse_event(got[0])
    assert e.value.reason == "too_large"


def test_ingest_without_keeping_offsets_counts_and_refuses_what_it_must(tmp_path, monkeypatch):
    from kafka import KafkaConsumer, TopicPartition

    from streams import ingest
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.topics import topic_specs

    monkeypatch.setattr(ingest, "SETTLE_BYTES", 100)  # confirm deliveries every few events
    settings = Settings(partitions=1)
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"p" * 40) for i in range(25))
                     + b"z" * (ingest.MAX_MESSAGE_BYTES + 10) + b"\n")
    with EmbeddedBroker(tmp_path / "broker") as b:
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        produced = ingest.produce_feed(feed, b.bootstrap, settings, keep=False)
        assert (produced.lines, produced.sent, produced.refused) == (26, 25, 1)
        assert not produced.offsets and not produced.origin  # nothing per event kept
        consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, consumer_timeout_ms=3000)
        consumer.assign([TopicPartition(settings.topic("events"), 0)])
        consumer.seek_to_beginning()
        values = [m.value for m in consumer]
        consumer.close()
        assert len(values) == 25 and values[0].startswith(b'{"n": 0,')


PRODUCE_AND_MEASURE = """
import json, sys
from pathlib import Path
from streams import ingest
from streams.settings import Settings

ingest.SETTLE_BYTES = 8 << 20
feed, bootstrap = Path(sys.argv[1]), sys.argv[2]
settings = Settings(partitions=2)
ingest.produce_feed(feed.with_name("warm.jsonl"), bootstrap, settings)  # imports, producer, metadata
# the process's own peak: ru_maxrss carries the forking test worker's across exec
hwm = lambda: int(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')).split()[1])  # noqa: E731
before = hwm()
produced = ingest.produce_feed(feed, bootstrap, settings)
grown_mb = (hwm() - before) / 1024
events = {f"{p}:{o}": produced.read_back(at).decode() for (p, o), at in produced.origin.items()}
print(json.dumps({"grown_mb": grown_mb, "sent": produced.sent, "events": events}))
"""


def test_replay_keeps_where_events_came_from_not_the_events(tmp_path):
    # Replay kept every event's bytes until the end, for resends: a feed of
    # large inline images filled memory (this one grew the process by more
    # than the feed's 110 MB). It keeps each event's place in the feed now,
    # and reads it back for a resend.
    import subprocess
    import sys

    from kafka import KafkaConsumer, TopicPartition

    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.topics import topic_specs

    settings = Settings(partitions=2)
    feed = tmp_path / "feed.jsonl"
    pad = "A" * 900_000
    with open(feed, "w") as f:
        for i in range(120):
            f.write(json.dumps({"event_id": f"e{i}", "pad": pad[i:]}) + "\n\n")
    (tmp_path / "warm.jsonl").write_text('{"event_id": "warm"}\n')
    with EmbeddedBroker(tmp_path / "broker") as b:
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        run = subprocess.run([sys.executable, "-c", PRODUCE_AND_MEASURE, str(feed), b.bootstrap],
                             capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 0, run.stderr[-2000:]
        got = json.loads(run.stdout)
        consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, consumer_timeout_ms=5000, fetch_max_bytes=64 << 20)
        consumer.assign([TopicPartition(settings.topic("events"), p) for p in range(2)])
        consumer.seek_to_beginning()
        on_topic = {f"{m.partition}:{m.offset}": m.value.decode() for m in consumer}
        consumer.close()
    assert got["sent"] == 120
    assert got["grown_mb"] < 60, got["grown_mb"]
    # each read-back is exactly what landed at that offset (the warm-up event aside)
    assert got["events"] == {k: v for k, v in on_topic.items() if '"warm"' not in v}


def test_png_whose_text_chunks_only_together_exceed_the_limit_is_still_analysed():
    import struct
    import zlib

    png = corpus.picture_png(8)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    one = chunk(b"zTXt", b"c\x00\x00" + zlib.compress(b"B" * (900 << 10), 9))  # under the 1 MB per-chunk limit
    data = png[:33] + one * 80 + png[33:]  # ~70 MB of text in total: over Pillow's 64 MB sum
    image = ImageData(data)
    assert image.rgb.size == (256, 192) and image.notes


def test_a_port_nothing_listens_on_is_said_to_be_unreachable_not_a_non_kafka_service():
    # serve-ingest before Kafka was up: "accepts connections but did not answer as a Kafka
    # broker ... check kafka.security_protocol", for a port that refused every connection
    from streams.broker import BrokerError, kafka_producer
    from tests.desk_support import free_port

    bootstrap = f"127.0.0.1:{free_port()}"
    with pytest.raises(BrokerError, match=f"cannot reach the Kafka broker at {bootstrap}") as e:
        kafka_producer(bootstrap, Settings(), client_id="t", timeout_s=2)
    assert "accepts connections" not in str(e.value)
