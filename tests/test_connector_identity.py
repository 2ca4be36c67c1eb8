"""Who posted it: Bluesky handles resolved from DID documents and verified
both ways (streams/connectors/atproto_identity.py), and Mastodon's frames
counted per stream.

Jetstream names a post's author by DID only, and sends a handle only when an
account's identity changes: almost every Bluesky event went out without
``account_handle``, all of them after a restart. Against loopback servers
standing in for the PLC directory, did:web hosts and handle hosts
(tests/connector_servers.py ``IdentityServer``), hostile ones included; host
names are pointed at them by standing in for the fetch stage's resolver
(``streams.safe_http._getaddrinfo``)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time

from prometheus_client import REGISTRY

from streams import safe_http
from streams.connectors.atproto_identity import HandleResolver
from streams.connectors.run import build_bluesky, build_mastodon, open_state
from streams.connectors.sinks import JsonlSink
from streams.safe_http import IPAddress, refuse_private
from tests.connector_servers import (FRAMES, Answer, IdentityServer, JetstreamServer, MastodonScript, MastodonServer,
                                     did_answer, json_answer, plc_document, sse_events)
from tests.test_connector_bluesky import run_until as bluesky_run_until
from tests.test_connector_bluesky import settings_for as bluesky_settings
from tests.test_connector_mastodon import run_until as mastodon_run_until
from tests.test_connector_mastodon import settings_for as mastodon_settings

PUBLIC = "https://93.184.215.14/img/{did}/{cid}"  # an address literal: the URL policy asks no DNS
T0 = 1732960800_000000
REPORTER = "did:plc:5xrilav5fvcyk43kkpdhieyg"  # a real person's account
IMPOSTOR = "did:plc:sno2frnzrvcma2dy7ibp3hah"  # an account posing as them
OTHER = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
NAMES = ("reporter.newsroom.com", "impostor.social", "other.newsroom.com", "photos.newsdesk.com", "slow.newsroom.com",
         "drip.newsroom.com", "huge.newsroom.com", "bounce.newsroom.com", "meta.newsroom.com")


def stand_in_dns(monkeypatch, *more: str) -> None:
    """Every name of ``NAMES`` and ``more`` resolves to 127.0.0.1; address literals to themselves."""
    names = set(NAMES) | set(more)

    def lookup(host: str, port: int) -> list:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    monkeypatch.setattr(safe_http, "_getaddrinfo", lookup)


def here_is_public(host: str, addrs: list[IPAddress]) -> None:
    """The fetch stage's private-address rule, with 127.0.0.1 (where the stand-in
    hosts listen) taken as a public address: every other address is judged as
    in production, 127.0.0.2 and 169.254.169.254 among them."""
    refuse_private(host, [a for a in addrs if str(a) != "127.0.0.1"])


def resolver_for(server: IdentityServer, state=None, **kw) -> HandleResolver:
    kw.setdefault("refuse", here_is_public)
    return HandleResolver(state, plc_url=server.url, origin=lambda host: f"http://{host}:{server.port}", **kw)


def plc(did: str) -> tuple[str, str]:
    return ("*", f"/{did}")


def well_known(handle: str) -> tuple[str, str]:
    return (handle, "/.well-known/atproto-did")


def verify(resolver: HandleResolver, did: str) -> tuple[str, str | None]:
    async def go():
        try:
            return await resolver.verify(did)
        finally:
            await resolver.aclose()
    return asyncio.run(go())


def post(rkey: str, time_us: int, did: str) -> str:
    return json.dumps({"did": did, "time_us": time_us, "kind": "commit", "commit": {
        "rev": "r", "operation": "create", "collection": "app.bsky.feed.post", "rkey": rkey,
        "record": {"text": "flood", "createdAt": "2024-11-30T10:00:00Z",
                   "embed": {"$type": "app.bsky.embed.images",
                             "images": [{"image": {"ref": {"$link": f"c{rkey}"}}}]}}}})


def identity(did: str, handle: str | None, time_us: int) -> str:
    return json.dumps({"did": did, "time_us": time_us, "kind": "identity",
                       "identity": {"did": did, "handle": handle, "seq": 1, "time": "2024-11-30T10:00:00Z"}})


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------
# Verification, both ways
# --------------------------------------------------------------------------
def test_a_handle_is_taken_only_when_it_resolves_back_to_the_same_did(monkeypatch):
    stand_in_dns(monkeypatch)
    routes = {
        plc(REPORTER): json_answer(plc_document(REPORTER, "Reporter.Newsroom.com")),
        well_known("reporter.newsroom.com"): did_answer(REPORTER),
        # The impostor writes the reporter's handle into its own DID document (anyone can);
        # the reporter's domain answers the reporter's DID, not the impostor's.
        plc(IMPOSTOR): json_answer(plc_document(IMPOSTOR, "reporter.newsroom.com")),
        # Only the first at:// entry is the handle: one listed after it is not taken either.
        plc(OTHER): json_answer(plc_document(OTHER, None, extra_aka=["https://other.example.org",
                                                                      "at://impostor.social",
                                                                      "at://reporter.newsroom.com"])),
        well_known("impostor.social"): did_answer(OTHER),
    }
    with IdentityServer(routes) as server:
        assert verify(resolver_for(server), REPORTER) == ("verified", "reporter.newsroom.com")  # lowercased
        assert verify(resolver_for(server), IMPOSTOR) == ("unverified", None)
        assert verify(resolver_for(server), OTHER) == ("verified", "impostor.social")
    # the document first, then the handle's host: the order of the spec's check
    assert server.hits[:2] == [("127.0.0.1", f"/{REPORTER}"), ("reporter.newsroom.com", "/.well-known/atproto-did")]


def test_documents_that_are_not_the_dids_own_and_handles_that_are_no_handles_give_none(monkeypatch):
    stand_in_dns(monkeypatch)
    web = "did:web:photos.newsdesk.com"
    routes = {
        # did:web: the host's document; it must name this DID, not another account's
        ("photos.newsdesk.com", "/.well-known/did.json"): json_answer(plc_document(REPORTER, "reporter.newsroom.com")),
        well_known("reporter.newsroom.com"): did_answer(REPORTER),
        plc(IMPOSTOR): json_answer(plc_document(IMPOSTOR, "localhost.localhost")),  # a reserved TLD
        plc(OTHER): Answer(410, b'{"message":"DID not available: did:plc:ewvi7nxzyoun6zhxrhs64oiz"}'),  # tombstoned
    }
    with IdentityServer(routes) as server:
        assert verify(resolver_for(server), web) == ("bad_document", None)
        routes[("photos.newsdesk.com", "/.well-known/did.json")] = json_answer(plc_document(web, "photos.newsdesk.com"))
        routes[well_known("photos.newsdesk.com")] = did_answer(web)
        assert verify(resolver_for(server), web) == ("verified", "photos.newsdesk.com")
        assert verify(resolver_for(server), IMPOSTOR) == ("no_handle", None)
        assert verify(resolver_for(server), OTHER) == ("not_found", None)
        before = len(server.hits)
        # not a DID this resolves (a path-level did:web, a did:key): nothing is asked
        assert verify(resolver_for(server), "did:web:photos.newsdesk.com:user:alice") == ("refused", None)
        assert verify(resolver_for(server), "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK") == \
            ("refused", None)
        assert len(server.hits) == before


# --------------------------------------------------------------------------
# Hostile hosts
# --------------------------------------------------------------------------
def test_slow_dripping_and_huge_answers_are_cut_off_at_their_bounds(monkeypatch):
    stand_in_dns(monkeypatch)
    doc = plc_document(REPORTER, "slow.newsroom.com")
    routes = {
        plc(REPORTER): json_answer(doc),
        well_known("slow.newsroom.com"): Answer(body=REPORTER.encode(), content_type="text/plain", delay_s=5.0),
        plc(IMPOSTOR): json_answer(plc_document(IMPOSTOR, "drip.newsroom.com")),
        # one byte every 0.1 s: every read succeeds, the answer never ends in time
        well_known("drip.newsroom.com"): Answer(body=IMPOSTOR.encode() * 10, content_type="text/plain", drip_s=0.1),
        plc(OTHER): Answer(body=b" " * (200 * 1024) + json.dumps(plc_document(OTHER, "other.newsroom.com")).encode()),
    }
    with IdentityServer(routes) as server:
        for did, want in ((REPORTER, "error"), (IMPOSTOR, "error"), (OTHER, "too_large")):
            t = time.monotonic()
            assert verify(resolver_for(server, request_timeout_s=0.5), did) == (want, None)
            assert time.monotonic() - t < 2.5, did
        # undeclared size (read until the server closes): cut off at the cap as it comes
        routes[plc(OTHER)] = Answer(body=b"x" * (200 * 1024), length=-1)
        assert verify(resolver_for(server, max_document_bytes=1024), OTHER) == ("too_large", None)
        # the whole resolution has a deadline of its own
        t = time.monotonic()
        routes[well_known("slow.newsroom.com")] = Answer(body=REPORTER.encode(), content_type="text/plain",
                                                         delay_s=0.4)
        routes[plc(REPORTER)] = Answer(body=json.dumps(doc).encode(), delay_s=0.4)
        assert verify(resolver_for(server, request_timeout_s=1.0, resolve_timeout_s=0.6), REPORTER) == ("error", None)
        assert time.monotonic() - t < 2.0


def test_redirects_to_private_addresses_and_private_hosts_are_refused_unasked(monkeypatch):
    stand_in_dns(monkeypatch)
    with IdentityServer({}, bind="127.0.0.2") as inside:
        inside.routes[("127.0.0.2", "/.well-known/atproto-did")] = did_answer(REPORTER)  # would verify, if asked
        routes = {
            plc(REPORTER): json_answer(plc_document(REPORTER, "bounce.newsroom.com")),
            well_known("bounce.newsroom.com"): Answer(302, headers={
                "Location": f"http://127.0.0.2:{inside.port}/.well-known/atproto-did"}),
            plc(IMPOSTOR): json_answer(plc_document(IMPOSTOR, "meta.newsroom.com")),
            well_known("meta.newsroom.com"): Answer(307, headers={
                "Location": "http://169.254.169.254/latest/meta-data/"}),
        }
        with IdentityServer(routes) as server:
            assert verify(resolver_for(server), REPORTER) == ("refused", None)
            assert verify(resolver_for(server), IMPOSTOR) == ("refused", None)
            # The default rule (fetch.allow_private_networks off), no stand-in: a handle host on a
            # private address is not asked at all. The configured PLC directory is (a mirror may be inside).
            hits = len(server.hits)
            strict = HandleResolver(plc_url=server.url, origin=lambda host: f"http://{host}:{server.port}")
            assert verify(strict, REPORTER) == ("refused", None)
            assert server.hits[hits:] == [("127.0.0.1", f"/{REPORTER}")]
            # ... and with fetch.allow_private_networks the redirect inside is followed
            opened = HandleResolver(plc_url=server.url, allow_private=True,
                                    origin=lambda host: f"http://{host}:{server.port}")
            assert verify(opened, REPORTER) == ("verified", "bounce.newsroom.com")
    assert inside.hits == [("127.0.0.2", "/.well-known/atproto-did")]  # only the last, allowed one


def test_a_429_from_the_plc_directory_pauses_resolutions_for_its_retry_after(monkeypatch):
    stand_in_dns(monkeypatch)
    routes = {plc(REPORTER): Answer(429, b'{"message":"Too Many Requests"}', headers={"Retry-After": "1"}),
              plc(OTHER): json_answer(plc_document(OTHER, "other.newsroom.com")),
              well_known("other.newsroom.com"): did_answer(OTHER)}
    with IdentityServer(routes) as server:
        r = resolver_for(server)

        async def go():
            try:
                assert await r.verify(REPORTER) == ("error", None)  # asked again after error_ttl_s
                t = time.monotonic()
                assert await r.verify(OTHER) == ("verified", "other.newsroom.com")
                return time.monotonic() - t
            finally:
                await r.aclose()
        assert asyncio.run(go()) >= 0.9


# --------------------------------------------------------------------------
# In the connector: off the frame path, bounded, persisted
# --------------------------------------------------------------------------
def test_frames_are_not_held_for_resolutions_which_run_bounded_and_survive_a_restart(monkeypatch, tmp_path):
    dids = [f"did:plc:{chr(ord('a') + i) * 24}" for i in range(8)]
    stand_in_dns(monkeypatch, *(f"{d[-1]}.newsroom.com" for d in dids))
    routes = {plc(d): Answer(body=json.dumps(plc_document(d, f"{d[-1]}.newsroom.com")).encode(), delay_s=2.0)
              for d in dids}
    routes |= {well_known(f"{d[-1]}.newsroom.com"): did_answer(d) for d in dids}
    frames = [post(f"p{i}", T0 + i, d) for i, d in enumerate(dids)]
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    verified_before = REGISTRY.get_sample_value("deepwatch_connector_handle_resolutions_total",
                                                {"outcome": "verified"}) or 0.0
    with IdentityServer(routes) as server, JetstreamServer(frames) as js:
        state = open_state(s, "t")
        sink = JsonlSink(io.StringIO(), keep=True)
        runner = build_bluesky(s, sink, state, url=js.url, resolver=resolver_for(server, state, concurrency=3))
        resolver = runner.mapper.resolver
        produced_at: list[float] = []
        resolved_then: list[int] = []

        async def first_run():
            t = time.monotonic()
            stop = asyncio.Event()
            task = asyncio.create_task(runner.run(stop))
            while len(sink.events) < len(dids):
                await asyncio.sleep(0.01)
            produced_at.append(time.monotonic() - t)
            resolved_then.append(resolver.cached[0])
            await resolver.wait_idle(30)
            await asyncio.sleep(0.3)  # a checkpoint interval (0.05 s) or more: the handles get saved
            stop.set()
            await asyncio.wait_for(task, 10)
        asyncio.run(first_run())
        state.close()
        # Every event went out before the first document came (each takes 2 s to answer) ...
        assert produced_at[0] < 2.0 and resolved_then == [0], (produced_at, resolved_then)
        assert [e.account_handle for e in sink.events] == [None] * len(dids)
        # ... the resolutions ran at most 3 at a time, each DID asked once
        assert server.max_inflight <= 3
        assert sorted(p for _, p in server.hits if p.startswith("/did:")) == sorted(f"/{d}" for d in dids)
        assert REGISTRY.get_sample_value("deepwatch_connector_handle_resolutions_total",
                                         {"outcome": "verified"}) == verified_before + len(dids)

        # A restart: the handles come from the state file, nothing is asked again.
        hits = len(server.hits)
        state = open_state(s, "t")
        sink = JsonlSink(io.StringIO(), keep=True)
        again = [post(f"q{i}", T0 + 10_000_000 + i, d) for i, d in enumerate(dids)]
        with JetstreamServer(again) as js2:
            runner = build_bluesky(s, sink, state, url=js2.url, resolver=resolver_for(server, state))
            asyncio.run(bluesky_run_until(runner, lambda: len(sink.events) >= len(dids)))
        state.close()
    assert [e.account_handle for e in sink.events] == [f"{d[-1]}.newsroom.com" for d in dids]
    assert server.hits[hits:] == []


def test_identity_frames_update_and_clear_what_was_resolved_and_win_over_a_late_resolution(monkeypatch, tmp_path):
    stand_in_dns(monkeypatch)
    routes = {plc(REPORTER): Answer(body=json.dumps(plc_document(REPORTER, "reporter.newsroom.com")).encode(),
                                    delay_s=0.8),
              well_known("reporter.newsroom.com"): did_answer(REPORTER)}
    # no reconnect (which would replay the identity frames) before the late answer is in
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC, idle_timeout_s=30.0)
    with IdentityServer(routes) as server:
        state = open_state(s, "t")
        resolver = resolver_for(server, state)
        state.save_handle(OTHER, "other.newsroom.com", time.time())  # resolved in an earlier run
        state.commit("x", None)
        frames = [post("a", T0, REPORTER),  # queues a resolution that answers in 0.8 s
                  identity(REPORTER, "reporter-moved.newsroom.com", T0 + 1),  # the relay's word, meanwhile
                  identity(OTHER, "handle.invalid", T0 + 2),  # the handle no longer verifies
                  post("b", T0 + 3, REPORTER), post("c", T0 + 4, OTHER)]
        sink = JsonlSink(io.StringIO(), keep=True)
        with JetstreamServer(frames) as js:
            runner = build_bluesky(s, sink, state, url=js.url, resolver=resolver)

            async def go():
                stop = asyncio.Event()
                task = asyncio.create_task(runner.run(stop))
                while len(sink.events) < 3:
                    await asyncio.sleep(0.01)
                await resolver.wait_idle(10)
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.wait_for(task, 10)
            asyncio.run(go())
        assert [(e.post_id[-1], e.account_handle) for e in sink.events] == [
            ("a", None), ("b", "reporter-moved.newsroom.com"), ("c", None)]
        assert (f"/{REPORTER}") in [p for _, p in server.hits]  # it was asked, and its answer set aside
        state.close()
        state = open_state(s, "t")  # what a restart reads
        assert state.handle(REPORTER)[0] == "reporter-moved.newsroom.com"
        assert state.handle(OTHER)[0] is None  # cleared in the state file too, not only in memory
        state.close()


def test_the_cache_is_bounded_in_entries_and_bytes_and_hits_and_misses_expire(monkeypatch, tmp_path):
    stand_in_dns(monkeypatch)
    now = [1_000_000.0]
    routes = {plc(REPORTER): json_answer(plc_document(REPORTER, "reporter.newsroom.com")),
              well_known("reporter.newsroom.com"): did_answer(REPORTER),
              plc(IMPOSTOR): json_answer(plc_document(IMPOSTOR, "reporter.newsroom.com"))}
    with IdentityServer(routes) as server:
        # long handles: the byte bound holds (each entry: the DID, the handle, ~200 bytes of its own)
        r = resolver_for(server, cache_max=100, cache_max_bytes=10_000)
        for i in range(1000):
            r.learned(f"did:web:h{i:04d}.newsroom.com", f"{'x' * 190}.newsroom.com")
        per = len("did:web:h0000.newsroom.com") + 190 + len(".newsroom.com") + 200
        assert r.cached == (10_000 // per, 10_000 // per * per)
        assert r.get("did:web:h0999.newsroom.com") and not r.get("did:web:h0000.newsroom.com")  # the oldest left
        # short ones: the count bound does
        r = resolver_for(server, cache_max=100, cache_max_bytes=10_000_000)
        for i in range(1000):
            r.learned(f"did:web:h{i:04d}.newsroom.com", "a.newsroom.com")
        assert r.cached[0] == 100

        async def go():
            r = resolver_for(server, hit_ttl_s=100, miss_ttl_s=10, error_ttl_s=1, clock=lambda: now[0])
            try:
                assert r.get(REPORTER) is None and r.get(IMPOSTOR) is None  # both queued
                await r.wait_idle(10)
                assert r.get(REPORTER) == "reporter.newsroom.com" and r.get(IMPOSTOR) is None
                asked = len(server.hits)
                now[0] += 11  # the miss expired, the hit not yet
                assert r.get(REPORTER) == "reporter.newsroom.com" and r.get(IMPOSTOR) is None
                await r.wait_idle(10)
                assert [p for _, p in server.hits[asked:] if p.startswith("/did:")] == [f"/{IMPOSTOR}"]
                now[0] += 100  # the hit expired: not served while it is verified again
                assert r.get(REPORTER) is None
                await r.wait_idle(10)
                assert r.get(REPORTER) == "reporter.newsroom.com"
            finally:
                await r.aclose()
        asyncio.run(go())


def test_a_full_queue_drops_and_counts_instead_of_growing(monkeypatch):
    stand_in_dns(monkeypatch)
    dids = [f"did:plc:{chr(ord('a') + i) * 24}" for i in range(10)]
    routes = {plc(d): Answer(404, b"{}", delay_s=0.5) for d in dids}
    with IdentityServer(routes) as server:
        r = resolver_for(server, concurrency=1, queue_max=2)

        async def go():
            try:
                for d in dids:
                    assert r.get(d) is None
                await r.wait_idle(10)
            finally:
                await r.aclose()
        asyncio.run(go())
    asked = [p for _, p in server.hits]
    assert len(asked) + r.counts["dropped"] == len(dids) and 2 <= len(asked) <= 3
    assert r.counts["not_found"] == len(asked)


# --------------------------------------------------------------------------
# Mastodon: frames per stream
# --------------------------------------------------------------------------
def test_mastodon_frames_are_counted_per_stream(tmp_path):
    # Two streams of one connector (a busy public timeline, a quiet hashtag):
    # frames_total had no stream label, so the quiet one could not be told apart.
    blocks = sse_events(FRAMES / "mastodon_stream.sse")
    busy = MastodonScript(streams=[blocks], drop=False)
    quiet = MastodonScript(streams=[[":thump\n\n"]], drop=False)
    s = mastodon_settings(tmp_path)

    def frames() -> dict[tuple[str, str], float]:
        # the registry is the process's: other tests' Mastodon streams counted before this one
        return {(m.labels["stream"], m.labels["outcome"]): m.value for f in REGISTRY.collect()
                if f.name == "deepwatch_connector_frames" for m in f.samples
                if m.name.endswith("_total") and m.labels.get("connector") == "mastodon"}

    before = frames()
    with MastodonServer(busy) as b, MastodonServer(quiet) as q:
        sink = JsonlSink(io.StringIO(), keep=True)
        r1 = build_mastodon(s, sink, open_state(s, "busy"), instance=b.url, timeline="public")
        r2 = build_mastodon(s, sink, open_state(s, "quiet"), instance=q.url, timeline="hashtag", hashtag="quiet")
        asyncio.run(mastodon_run_until(r1, lambda: r1.emitter.counts.get("delete", 0) > 0))
        asyncio.run(mastodon_run_until(r2, lambda: len(q.stream_requests) > 0, timeout=3))
    busy_stream, quiet_stream = r1.emitter.stream, r2.emitter.stream
    assert busy_stream != quiet_stream
    after = frames()
    counted = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    for outcome, n in r1.emitter.counts.items():
        if not outcome.startswith("events_") and outcome != "cursor_ahead":
            assert counted.get((busy_stream, outcome), 0.0) == n, outcome
    assert r1.emitter.counts["image_post"] > 0
    assert not [key for key in counted if key[0] == quiet_stream]


def test_the_plc_directory_is_a_setting(tmp_path):
    # a newsroom running a PLC mirror inside its network sets connectors.plc_url; it was a
    # constructor argument only, so `deepwatch connect bluesky` always asked plc.directory
    s = bluesky_settings(tmp_path, bluesky_image_url=PUBLIC)
    assert build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, "t", memory=True)).mapper.resolver.plc_url \
        == "https://plc.directory"
    s.connectors.plc_url = "https://plc.mirror.newsroom.example/"
    runner = build_bluesky(s, JsonlSink(io.StringIO()), open_state(s, "u", memory=True))
    assert runner.mapper.resolver.plc_url == "https://plc.mirror.newsroom.example"
