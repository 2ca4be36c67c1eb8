"""``deepwatch serve-ingest``: auth, limits, per-line results, dead letters
and backpressure, against the real embedded broker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from streams.topics import topic_specs
from streams.broker import EmbeddedBroker, ensure_topics, free_port
from streams.ingest_server import TokenConfigError, build_app, load_tokens
from streams.records import DeadLetter, ImageEvent
from streams.settings import Settings
from tests.connector_servers import read_topic
from tests.support import wait_healthy

REPO = Path(__file__).resolve().parents[1]
TOKEN = "desk-token-0123456789abcdef"
OTHER = "tipline-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def event(i: int, **over) -> dict:
    doc = {"schema_version": 1, "event_id": f"tip-{i}", "platform": "tipline", "account_id": f"src-{i}",
           "posted_at": "2026-11-30T10:00:00Z", "image": {"url": f"https://images.example.org/{i}.jpg"}}
    doc.update(over)
    return doc


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
def settings(broker, tmp_path, request):
    # a topic prefix per test, so each test reads only its own messages
    s = Settings(data_dir=tmp_path, broker=f"kafka://{broker.bootstrap}", topic_prefix=f"t{abs(hash(request.node.name)) % 10**8}")
    s.connectors.ingest_burst = 100
    ensure_topics(broker.bootstrap, topic_specs(s))
    return s


def client(settings: Settings, **kw) -> TestClient:
    return TestClient(build_app(settings, {TOKEN: "desk", OTHER: "tipline"}, **kw))


def test_tokens_come_from_the_environment_only():
    assert load_tokens("X", {"X": f"desk:{TOKEN}, tipline:{OTHER}"}) == {TOKEN: "desk", OTHER: "tipline"}
    assert load_tokens("X", {"X": TOKEN}) == {TOKEN: "token-1"}
    assert load_tokens("X", {}) == {}
    with pytest.raises(TokenConfigError, match="shorter than 16"):
        load_tokens("X", {"X": "desk:short"})
    with pytest.raises(TokenConfigError, match="no ingest tokens"):
        build_app(Settings(), {})


def test_blanks_around_a_configured_token_are_dropped_and_blanks_inside_refused(settings):
    # "desk: TOKEN" kept the space: the server started, and every request was 401.
    tokens = load_tokens("X", {"X": f"desk: {TOKEN} , tipline :{OTHER}\t"})
    assert tokens == {TOKEN: "desk", OTHER: "tipline"}
    with TestClient(build_app(settings, tokens)) as c:
        assert c.post("/ingest", content=json.dumps(event(1)), headers=AUTH).status_code == 202
    with pytest.raises(TokenConfigError, match="'desk' contains whitespace.*commas"):
        load_tokens("X", {"X": f"desk:{TOKEN} tipline:{OTHER}"})  # a missing comma


def test_requests_without_a_valid_bearer_token_are_refused(settings):
    with client(settings) as c:
        assert c.post("/ingest", content=json.dumps(event(1))).status_code == 401
        r = c.post("/ingest", content=json.dumps(event(1)), headers={"Authorization": "Bearer nope-nope-nope-nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = c.post("/ingest", content=json.dumps(event(1)), headers={"Authorization": TOKEN})
        assert r.status_code == 401


def test_ndjson_gets_a_result_per_line_and_rejects_are_dead_lettered(settings, broker):
    lines = [
        json.dumps(event(1)),
        "{not json",
        json.dumps({k: v for k, v in event(3).items() if k != "account_id"}),
        "",  # blank lines are not events
        json.dumps(event(5, image={"path": "/etc/passwd"})),
        json.dumps(event(6, image={"url": "http://127.0.0.1:8080/admin.png"})),
        json.dumps(event(7, schema_version=2)),
        json.dumps(event(8, text="café ☕", hashtags=["breaking"])),
        json.dumps(event(9, image={"blob": "0" * 64})),
    ]
    with client(settings) as c:
        r = c.post("/ingest", content="\n".join(lines) + "\n", headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 2 and body["dead_lettered"] == 6
    by_line = {x["line"]: x for x in body["results"]}
    assert sorted(by_line) == [1, 2, 3, 5, 6, 7, 8, 9]
    assert by_line[1] == {"line": 1, "status": "accepted", "event_id": "tip-1"}
    assert by_line[2]["reason"] == "malformed_json" and by_line[2]["status"] == "dead_lettered"
    assert by_line[3]["reason"] == "schema_violation" and "account_id" in by_line[3]["detail"]
    assert by_line[5]["reason"] == "path_not_allowed"
    assert by_line[6]["reason"] == "blocked_address"
    assert by_line[7]["reason"] == "unsupported_version"
    assert by_line[8]["status"] == "accepted"
    assert by_line[9]["reason"] == "blob_not_allowed"

    produced = read_topic(broker.bootstrap, settings.topic("events"), 2)
    assert sorted(ImageEvent.loads(v).event_id for v in produced) == ["tip-1", "tip-8"]
    assert json.dumps(event(8, text="café ☕", hashtags=["breaking"])).encode() in produced  # the caller's bytes
    dead = [DeadLetter.loads(v) for v in read_topic(broker.bootstrap, settings.topic("dead-letters"), 6)]
    assert sorted((d.reason, d.stage) for d in dead) == sorted([
        ("malformed_json", "validate"), ("schema_violation", "validate"), ("path_not_allowed", "validate"),
        ("blocked_address", "fetch"), ("unsupported_version", "validate"), ("blob_not_allowed", "validate")])
    assert all("HTTP ingest (desk)" in d.detail and d.payload_excerpt for d in dead)


def test_one_pretty_printed_json_event(settings, broker):
    with client(settings) as c:
        r = c.post("/ingest", content=json.dumps(event(42), indent=2), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["accepted"] == 1
    assert [ImageEvent.loads(v).event_id for v in read_topic(broker.bootstrap, settings.topic("events"), 1)] == ["tip-42"]


def test_size_and_line_limits(settings):
    settings.connectors.ingest_max_body_bytes = 4000
    settings.connectors.ingest_max_lines = 3
    with client(settings) as c:
        big = json.dumps(event(1, text="x" * 5000))
        assert c.post("/ingest", content=big, headers=AUTH).status_code == 413
        many = "\n".join(json.dumps(event(i)) for i in range(4))
        r = c.post("/ingest", content=many, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"] == "too_many_lines"
        assert c.post("/ingest", content="\n\n", headers=AUTH).status_code == 400


def test_gzip_bodies_are_inflated_within_the_body_limit(settings):
    # A gzip body was read as it came: every line dead-lettered as malformed JSON.
    import gzip

    settings.connectors.ingest_max_body_bytes = 4000
    gz = {**AUTH, "Content-Encoding": "gzip"}
    two = "\n".join(json.dumps(event(i)) for i in range(2)).encode()
    with client(settings) as c:
        r = c.post("/ingest", content=gzip.compress(two), headers=gz)
        assert r.status_code == 202 and r.json()["accepted"] == 2
        bomb = gzip.compress(b"\n" * 1_000_000)  # about 1 KB sent, 1 MB once inflated
        assert len(bomb) < 4000
        r = c.post("/ingest", content=bomb, headers=gz)
        assert r.status_code == 413 and "decompressed" in r.json()["detail"]
        assert c.post("/ingest", content=two, headers=gz).json()["error"] == "bad_gzip"
        assert c.post("/ingest", content=gzip.compress(two)[:-12], headers=gz).json()["error"] == "bad_gzip"
        r = c.post("/ingest", content=two, headers={**AUTH, "Content-Encoding": "br"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_encoding"
        assert c.head("/healthz").status_code == 200  # uptime checkers send HEAD


def test_every_member_of_a_multi_member_gzip_body_is_read(settings, broker):
    # `cat a.gz b.gz` is one valid gzip body (RFC 1952); only the first
    # member's events were taken, the rest lost behind a 202.
    import gzip

    settings.connectors.ingest_max_body_bytes = 4000
    gz = {**AUTH, "Content-Encoding": "gzip"}
    first = "\n".join(json.dumps(event(i)) for i in range(2)).encode() + b"\n"
    second = json.dumps(event(2)).encode() + b"\n"
    with client(settings) as c:
        r = c.post("/ingest", content=gzip.compress(first) + gzip.compress(second), headers=gz)
        assert r.status_code == 202 and r.json()["accepted"] == 3, r.text
        assert sorted(ImageEvent.loads(v).event_id for v in read_topic(broker.bootstrap, settings.topic("events"), 3)) \
            == ["tip-0", "tip-1", "tip-2"]
        # the body limit holds for all members together
        half = gzip.compress(b"\n" * 2500)
        r = c.post("/ingest", content=half + half, headers=gz)
        assert r.status_code == 413 and "decompressed" in r.json()["detail"], r.text
        # bytes after a member that are not another member: refused, not ignored
        r = c.post("/ingest", content=gzip.compress(second) + b"tip-9 was here\n", headers=gz)
        assert r.status_code == 400 and r.json()["error"] == "bad_gzip", r.text
        assert "after gzip member 1" in r.json()["detail"]
        r = c.post("/ingest", content=gzip.compress(second) + gzip.compress(second)[:-12], headers=gz)
        assert r.status_code == 400 and "cut short" in r.json()["detail"], r.text
        # a flood of empty members is refused at a bound, not inflated one by one for seconds
        settings.connectors.ingest_max_body_bytes = 8 * 1024 * 1024  # read per request: 4 MB of members fit
        t0 = time.monotonic()
        r = c.post("/ingest", content=gzip.compress(b"") * 200_000, headers=gz)
        assert r.status_code == 400 and "gzip members" in r.json()["detail"], r.text
        assert time.monotonic() - t0 < 2


def test_an_image_url_that_cannot_be_parsed_is_a_dead_letter_not_a_lost_batch(settings, broker):
    # urlsplit raised ValueError outside the URL policy's guard: the request
    # was answered 500 and its valid lines neither accepted nor dead-lettered.
    lines = [json.dumps(event(1)),
             json.dumps(event(2, image={"url": "http://[::1/x.jpg"})),
             json.dumps(event(3, image={"url": "http://a\uff03b@images.example.org/3.jpg"})),
             json.dumps(event(4))]
    with client(settings) as c:
        r = c.post("/ingest", content="\n".join(lines), headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    by_line = {x["line"]: x for x in r.json()["results"]}
    assert [by_line[n]["status"] for n in (1, 2, 3, 4)] == ["accepted", "dead_lettered", "dead_lettered", "accepted"]
    assert by_line[2]["reason"] == by_line[3]["reason"] == "bad_url"
    produced = read_topic(broker.bootstrap, settings.topic("events"), 2)
    assert sorted(ImageEvent.loads(v).event_id for v in produced) == ["tip-1", "tip-4"]
    dead = [DeadLetter.loads(v) for v in read_topic(broker.bootstrap, settings.topic("dead-letters"), 2)]
    assert sorted((d.event_id, d.stage, d.reason) for d in dead) == [("tip-2", "fetch", "bad_url"),
                                                                     ("tip-3", "fetch", "bad_url")]


class _ListSink:
    def __init__(self):
        self.sent: list[bytes] = []
        self.dead: list[DeadLetter] = []

    def send_raw(self, key, value):
        self.sent.append(value)

    def dead_letter(self, dl):
        self.dead.append(dl)

    def flush(self):
        pass

    def close(self):
        pass


def test_url_checks_run_together_within_one_deadline(tmp_path, monkeypatch):
    """Each line's URL check waited up to 2 s for DNS, one line after the
    other: 500 lines on slow hosts held the request (and its memory) for over
    a quarter of an hour. Now each distinct host is checked once, several at
    a time, all within the request's deadline; a line whose check did not
    finish is accepted with a reason that says so (the fetch stage checks it)."""
    import streams.safe_http as safe_http

    release = threading.Event()
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        if host.endswith(".tarpit.test"):
            release.wait(10)
            raise socket.gaierror("gave up")
        address = "127.0.0.1" if host == "inside.test" else "93.184.216.34"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(safe_http, "DNS_POOL", safe_http._DnsPool(8, 32))
    sink = _ListSink()
    settings = Settings(data_dir=tmp_path)
    app = build_app(settings, {TOKEN: "desk"}, sink_factory=lambda: sink, missing_topics=lambda: [],
                    url_check_s=1.0)
    lines = ([event(i, image={"url": f"https://inside.test/{i}.jpg"}) for i in range(5)]
             + [event(5, image={"url": "https://cdn.test/5.jpg"})]
             + [event(6 + i, image={"url": f"https://h{i}.tarpit.test/a.jpg"}) for i in range(30)])
    try:
        with TestClient(app) as c:
            started = time.monotonic()
            r = c.post("/ingest", content="\n".join(json.dumps(d) for d in lines), headers=AUTH)
            took = time.monotonic() - started
    finally:
        release.set()
    assert r.status_code == 202, r.text
    assert took < 3.0, took  # one after the other: 30 x 2 s
    body = r.json()
    assert (body["accepted"], body["dead_lettered"]) == (31, 5)
    by_line = {x["line"]: x for x in body["results"]}
    assert [by_line[n]["reason"] for n in range(1, 6)] == ["blocked_address"] * 5
    assert by_line[6] == {"line": 6, "status": "accepted", "event_id": "tip-5"}
    late = [by_line[n] for n in range(7, 37)]
    assert all(x == {"line": x["line"], "status": "accepted", "event_id": x["event_id"], "url_checked": False}
               for x in late), late
    assert sorted(d.event_id for d in sink.dead) == [f"tip-{i}" for i in range(5)]
    assert len(sink.sent) == 31
    assert asked.count("inside.test") == 1 and asked.count("cdn.test") == 1  # each host once
    assert 8 <= sum(h.endswith(".tarpit.test") for h in asked) < 30  # several at a time, not all


def test_per_token_rate_limit(settings):
    settings.connectors.ingest_burst = 5
    settings.connectors.ingest_rate_per_s = 0.5
    with client(settings) as c:
        five = "\n".join(json.dumps(event(i)) for i in range(5))
        assert c.post("/ingest", content=five, headers=AUTH).status_code == 202
        r = c.post("/ingest", content=json.dumps(event(9)), headers=AUTH)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # another token has its own bucket
        r = c.post("/ingest", content=json.dumps(event(10)), headers={"Authorization": f"Bearer {OTHER}"})
        assert r.status_code == 202
        metrics = c.get("/metrics").text
    assert 'deepwatch_ingest_requests_total{status="429",token="desk"}' in metrics
    assert 'deepwatch_ingest_lines_total{outcome="accepted",token="tipline"}' in metrics


def test_broker_unavailable_is_503_with_retry_after(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    settings = Settings(data_dir=tmp_path, broker=f"kafka://127.0.0.1:{dead}")
    settings.connectors.ingest_broker_timeout_s = 1.0
    before = broker_failures("unavailable")
    timed = {k: answered_in(k) for k in ("5xx", "4xx")}
    with client(settings) as c:
        t0 = time.monotonic()
        r = c.post("/ingest", content=json.dumps(event(1)), headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == "broker_unavailable" and time.monotonic() - t0 < 10
        assert "cause" not in r.json()
        assert c.get("/healthz").json()["broker"] == "unavailable"
        assert c.post("/ingest", content=json.dumps(event(1))).status_code == 401
    assert broker_failures("unavailable") == before + 1
    # every answer is timed, by status class: the slow one here is the 503 (only 202s were)
    assert answered_in("5xx") == timed["5xx"] + 1 and answered_in("4xx") == timed["4xx"] + 1


def answered_in(status_class: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("deepwatch_ingest_request_seconds_count", {"class": status_class}) or 0.0


def broker_failures(cause: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("deepwatch_ingest_broker_failures_total", {"cause": cause}) or 0.0


def _topic_partitions(bootstrap: str, names: list[str]) -> dict[str, int]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-topics")
    try:
        found = [n for n in names if n in set(admin.list_topics())]
        if not found:  # describe_topics([]) describes every topic
            return {}
        return {d["name"]: len(d["partitions"]) for d in admin.describe_topics(found)}
    finally:
        admin.close()


def test_missing_topics_are_refused_as_topic_missing_and_never_created_on_first_use(broker, tmp_path):
    # A broker that does not auto-create topics (compose; production Kafka):
    # serve-ingest answered 503 "did not acknowledge in time" for every request
    # until a worker had created them, the same words as for a broker gone, and
    # its /healthz said ok. A broker that does auto-create (Tansu) made the
    # topics on first use with its own partition count, not deepwatch's.
    settings = Settings(data_dir=tmp_path, broker=f"kafka://{broker.bootstrap}", topic_prefix="notopics")
    settings.connectors.ingest_broker_timeout_s = 2.0
    events, dead = settings.topic("events"), settings.topic("dead-letters")
    before, other = broker_failures("topic_missing"), broker_failures("unavailable")
    with client(settings) as c:
        assert c.get("/healthz").json() == {"status": "ok", "broker": "untried"}
        r = c.post("/ingest", content=json.dumps(event(1)), headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
        body = r.json()
        assert body["error"] == "broker_unavailable" and body["cause"] == "topic_missing", body
        assert events in body["detail"]
        health = c.get("/healthz")
        assert health.status_code == 200, "liveness: a restart would not create the topics"
        assert health.json() == {"status": "ok", "broker": "topic_missing"}  # the topics: in the 503 and the log
        assert broker_failures("topic_missing") == before + 1 and broker_failures("unavailable") == other
        assert _topic_partitions(broker.bootstrap, [events, dead]) == {}, "created on first use"

        ensure_topics(broker.bootstrap, topic_specs(settings))  # a worker starts
        time.sleep(2.1)  # the gate answers at once for its timeout after a failure
        r = c.post("/ingest", content=json.dumps(event(2)), headers=AUTH)
        assert r.status_code == 202, r.text
        assert c.get("/healthz").json() == {"status": "ok", "broker": "ok"}
    assert [ImageEvent.loads(v).event_id for v in read_topic(broker.bootstrap, events, 1)] == ["tip-2"]


def test_serve_ingest_create_topics_creates_them_as_a_worker_would(broker, tmp_path):
    # Compose and Kubernetes may start serve-ingest before any worker: with
    # --create-topics it creates the topics itself, with the workers' partition counts.
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": f"desk:{TOKEN}",
           "DEEPWATCH_TOPIC_PREFIX": "createdbyingest", "DEEPWATCH_DATA_DIR": str(tmp_path)}
    settings = Settings(topic_prefix="createdbyingest")
    specs = [s for s in topic_specs(settings) if s.name.startswith("createdbyingest.")]  # not Faust's own
    assert len(specs) >= 2 and _topic_partitions(broker.bootstrap, [s.name for s in specs]) == {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--host", "127.0.0.1", "--port", str(port),
         "--broker", f"kafka://{broker.bootstrap}", "--create-topics"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        assert _topic_partitions(broker.bootstrap, [s.name for s in specs]) == {s.name: s.partitions for s in specs}
        r = httpx.post(f"http://127.0.0.1:{port}/ingest", headers=AUTH, content=json.dumps(event(1)), timeout=20)
        assert r.status_code == 202, r.text
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    # a broker it cannot reach: one line, before it listens
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--port", str(free_port()),
                        "--broker", "kafka://127.0.0.1:1", "--create-topics"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "127.0.0.1:1" in r.stderr, r.stderr


def test_cli_ingest_creates_the_topics_as_a_worker_would(broker, tmp_path):
    # `deepwatch ingest` before any worker: the broker made the events topic on
    # first use with its own partition count (Tansu: 1), so the workers' keyed
    # partitions never matched it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_TOPIC_PREFIX": "ingestcli",
           "DEEPWATCH_DATA_DIR": str(tmp_path)}
    settings = Settings(topic_prefix="ingestcli")
    specs = [s for s in topic_specs(settings) if s.name.startswith("ingestcli.")]
    assert any(s.partitions > 1 for s in specs) and _topic_partitions(broker.bootstrap, [s.name for s in specs]) == {}
    feed = tmp_path / "feed.jsonl"
    feed.write_text("".join(json.dumps(event(i)) + "\n" for i in range(3)))
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "ingest", str(feed),
                        "--broker", f"kafka://{broker.bootstrap}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "produced 3 events" in r.stderr, r.stderr
    assert _topic_partitions(broker.bootstrap, [s.name for s in specs]) == {s.name: s.partitions for s in specs}
    got = [ImageEvent.loads(v).event_id for v in read_topic(broker.bootstrap, settings.topic("events"), 3)]
    assert sorted(got) == sorted(event(i)["event_id"] for i in range(3))


def test_serve_ingest_command_end_to_end(broker, tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": f"desk:{TOKEN}",
           "DEEPWATCH_TOPIC_PREFIX": "cli", "DEEPWATCH_DATA_DIR": str(tmp_path)}
    settings = Settings(topic_prefix="cli")
    ensure_topics(broker.bootstrap, topic_specs(settings))
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--host", "127.0.0.1", "--port", str(port),
         "--broker", f"kafka://{broker.bootstrap}", "--metrics-port", str(metrics_port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        r = httpx.post(f"http://127.0.0.1:{port}/ingest", headers=AUTH,
                       content="\n".join(json.dumps(event(i)) for i in range(3)), timeout=20)
        assert r.status_code == 202 and r.json()["accepted"] == 3
        assert len(read_topic(broker.bootstrap, settings.topic("events"), 3)) == 3
        # --metrics-port: metrics (their labels name token holders) off the public port
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200 and 'deepwatch_ingest_requests_total{status="202",token="desk"}' in scraped.text
        # the liveness probe's /healthz there follows the endpoint's event loop (it said "no heartbeat yet" for good)
        alive = httpx.get(f"http://127.0.0.1:{metrics_port}/healthz")
        assert alive.status_code == 200 and "event loop beat" in alive.text, alive.text
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=20)
    assert '"msg": "ingested"' in stderr and TOKEN not in stderr  # structured logs name the token, never show it
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--broker", "kafka://127.0.0.1:1"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": ""},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "DEEPWATCH_INGEST_TOKENS" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--broker", "kafka://127.0.0.1:1",
                        "--port", "8099", "--metrics-port", "8099"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--metrics-port 8099 is --port too" in r.stderr and "Traceback" not in r.stderr


def test_serve_ingest_refuses_a_broker_url_it_could_never_use_at_start(tmp_path):
    # It started, and answered every request 503 "re-send" for good, where
    # `deepwatch ingest` refuses the same URL with one line.
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEEPWATCH_INGEST_TOKENS": f"desk:{TOKEN}",
           "DEEPWATCH_DATA_DIR": str(tmp_path)}
    for url, says in (("kafka://127.0.0.1:99999", "port 1-65535"), ("http://127.0.0.1:9092", "kafka://HOST:PORT")):
        r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "serve-ingest", "--port", str(free_port()),
                            "--broker", url], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_request_larger_than_the_token_burst_is_refused_as_too_many_lines_not_rate_limited(settings):
    # With the defaults (1000 lines a request, a burst of 500) a request of 501
    # lines was answered 429 "Retry-After: 3600" however long the client waited.
    settings.connectors.ingest_burst = 5
    settings.connectors.ingest_max_lines = 10
    with client(settings) as c:
        six = "\n".join(json.dumps(event(i)) for i in range(6))
        r = c.post("/ingest", content=six, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"] == "too_many_lines", r.text
        assert "5" in r.json()["detail"] and "retry-after" not in r.headers
        assert c.post("/ingest", content="\n".join(json.dumps(event(i)) for i in range(5)), headers=AUTH).status_code == 202


# -- the shared budget of buffered request bytes ------------------------------
@contextmanager
def live_server(settings: Settings, tokens: dict[str, str] | None = None):
    """The app under a real uvicorn on a loopback port, in a thread: only a
    real server lets a client hold a request open with half its body sent.
    ``tokens``: token -> name (default: TOKEN as "desk" only)."""
    with served(build_app(settings, tokens or {TOKEN: "desk"})) as port:
        yield port


@contextmanager
def served(app, **config):
    """``app`` under a real uvicorn on a loopback port with the config
    ``serve-ingest`` runs it with (``server_config``; ``config`` overrides its
    bounds), in a thread; its port."""
    import uvicorn

    from streams.ingest_server import server_config

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def buffered_bytes(port: int) -> float | None:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith("deepwatch_ingest_buffered_bytes "):
            return float(line.split()[1])
    return None


def wait_for_buffered(port: int, value: float, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while (got := buffered_bytes(port)) != value:
        assert time.monotonic() < deadline, f"buffered bytes {got}, expected {value}"
        time.sleep(0.05)


def ndjson_of_size(first: int, size: int) -> bytes:
    """Valid events, padded (in their text) to exactly ``size`` bytes."""
    lines = [json.dumps(event(first + i, text="")) for i in range(3)]
    pad = size - len("\n".join(lines))
    assert pad > 0
    lines[0] = json.dumps(event(first, text="x" * pad))
    body = "\n".join(lines).encode()
    assert len(body) == size
    return body


def open_request(port: int, head_extra: str, first_bytes: bytes, token: str = TOKEN) -> socket.socket:
    """A request whose head and ``first_bytes`` of body are sent, the rest not (yet)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"POST /ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/x-ndjson\r\n{head_extra}\r\n").encode() + first_bytes)
    return s


@contextmanager
def first_bytes_of(port: int, bodies: list[bytes]):
    """One request per body, each sent with its Content-Length and first byte
    only (a token holder sending slowly, or never); closed on the way out,
    and then the server must give back every byte they held."""
    held = [open_request(port, f"Content-Length: {len(b)}\r\n", b[:1]) for b in bodies]
    try:
        yield held
    finally:
        for h in held:
            h.close()
    wait_for_buffered(port, 0)


def test_concurrent_bodies_beyond_the_buffer_budget_are_refused_busy_and_the_budget_frees(settings):
    # Memory was bounded per request only: 256 concurrent 8 MiB bodies (each
    # held about three times over) could take gigabytes.
    settings.connectors.ingest_max_buffered_bytes = 10_000
    held = ndjson_of_size(100, 6000)
    with live_server(settings) as port:
        url = f"http://127.0.0.1:{port}/ingest"
        assert buffered_bytes(port) == 0
        holder = open_request(port, f"Content-Length: {len(held)}\r\n", held[:5000])
        try:
            wait_for_buffered(port, 5000)  # what arrived, not what was declared

            def post(i: int) -> httpx.Response:
                return httpx.post(url, content=ndjson_of_size(10 * i, 6000), headers=AUTH, timeout=20)

            t0 = time.monotonic()
            with ThreadPoolExecutor(5) as pool:
                refused = list(pool.map(post, range(1, 6)))
            assert time.monotonic() - t0 < 5
            for r in refused:
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "busy" and r.headers["retry-after"] == "1"
            # a small request still fits beside the one held
            r = httpx.post(url, content=json.dumps(event(90)), headers=AUTH, timeout=20)
            assert r.status_code == 202, r.text
            holder.sendall(held[5000:])
            holder.settimeout(20)
            answer = holder.recv(65536)
            assert answer.startswith(b"HTTP/1.1 202"), answer
        finally:
            holder.close()
        wait_for_buffered(port, 0)
        r = httpx.post(url, content=ndjson_of_size(200, 9000), headers=AUTH, timeout=20)
        assert r.status_code == 202 and r.json()["accepted"] == 3, r.text
        assert buffered_bytes(port) == 0
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'deepwatch_ingest_requests_total{status="503",token="desk"}' in metrics


def test_declared_lengths_never_sent_do_not_lock_other_token_holders_out(settings):
    # A declared Content-Length was reserved before a byte arrived: one token
    # holder opening requests declaring the body limit and sending nothing
    # answered every other client 503 busy for the 60 s body timeout.
    settings.connectors.ingest_max_body_bytes = 5000
    settings.connectors.ingest_max_buffered_bytes = 8 * 5000
    body = ndjson_of_size(1, 5000)
    with live_server(settings, {TOKEN: "desk", OTHER: "tipline"}) as port, first_bytes_of(port, [body] * 8):
        wait_for_buffered(port, 8)  # what arrived, not what was declared
        r = httpx.post(f"http://127.0.0.1:{port}/ingest", content=json.dumps(event(90)),
                       headers={"Authorization": f"Bearer {OTHER}"}, timeout=20)
        assert r.status_code == 202, r.text


def test_one_token_holder_sending_slowly_holds_at_most_half_the_budget(settings):
    # Sending all but the last byte of each body, one token holder could
    # still fill the whole budget; with several token names each may hold
    # half of it, so the others keep room.
    import select

    settings.connectors.ingest_max_body_bytes = 5000
    settings.connectors.ingest_max_buffered_bytes = 8 * 5000
    bodies = [ndjson_of_size(10 * i, 5000) for i in range(8)]
    with live_server(settings, {TOKEN: "desk", OTHER: "tipline"}) as port, first_bytes_of(port, bodies) as hogs:
        wait_for_buffered(port, 8)
        answered = {}
        for i, (h, b) in enumerate(zip(hogs, bodies)):
            before = buffered_bytes(port)
            h.sendall(b[1:-1])
            deadline = time.monotonic() + 10
            while buffered_bytes(port) != before + len(b) - 2:  # held, or refused:
                if select.select([h], [], [], 0.05)[0]:
                    answered[i] = h.recv(65536)
                    break
                assert time.monotonic() < deadline, f"request {i}: neither held nor answered"
        # four bodies of 4999 bytes are half the budget: the next ones are refused
        assert sorted(answered) == [4, 5, 6, 7], answered
        assert all(a.startswith(b"HTTP/1.1 503") and b'"busy"' in a for a in answered.values()), answered
        assert buffered_bytes(port) == 4 * 4999
        # the other token holder's largest body still fits beside them
        r = httpx.post(f"http://127.0.0.1:{port}/ingest", content=ndjson_of_size(100, 5000),
                       headers={"Authorization": f"Bearer {OTHER}"}, timeout=20)
        assert r.status_code == 202, r.text
        # and the hog's bodies held are served once their last byte comes
        for i, (h, b) in enumerate(zip(hogs, bodies)):
            if i not in answered:
                h.sendall(b[-1:])
                h.settimeout(20)
                assert h.recv(65536).startswith(b"HTTP/1.1 202")


def test_a_client_gone_mid_body_gives_its_reservation_back(settings):
    settings.connectors.ingest_max_buffered_bytes = 10_000
    with live_server(settings) as port:
        # with a Content-Length
        gone = open_request(port, "Content-Length: 8000\r\n", b"{" * 3000)
        wait_for_buffered(port, 3000)
        gone.close()
        wait_for_buffered(port, 0)
        # chunked
        gone = open_request(port, "Transfer-Encoding: chunked\r\n", b"bb8\r\n" + b"{" * 3000 + b"\r\n")
        wait_for_buffered(port, 3000)
        gone.close()
        wait_for_buffered(port, 0)
        # had either kept its bytes, this one would not fit beside it
        r = httpx.post(f"http://127.0.0.1:{port}/ingest", content=ndjson_of_size(1, 9000), headers=AUTH, timeout=20)
        assert r.status_code == 202, r.text


def test_an_inflated_gzip_body_counts_against_the_buffer_budget(settings):
    import gzip

    settings.connectors.ingest_max_buffered_bytes = 10_000
    inflates = gzip.compress(ndjson_of_size(1, 9000))  # well under 1 KB sent
    gz = {**AUTH, "Content-Encoding": "gzip"}
    with live_server(settings) as port:
        url = f"http://127.0.0.1:{port}/ingest"
        holder = open_request(port, "Content-Length: 3000\r\n", b"{" * 2000)
        try:
            wait_for_buffered(port, 2000)
            r = httpx.post(url, content=inflates, headers=gz, timeout=20)
            assert r.status_code == 503 and r.json()["error"] == "busy", r.text
        finally:
            holder.close()
        wait_for_buffered(port, 0)
        r = httpx.post(url, content=inflates, headers=gz, timeout=20)
        assert r.status_code == 202 and r.json()["accepted"] == 3, r.text


def test_a_body_of_many_short_lines_is_refused_without_splitting_it_all(settings):
    # Split up front, an 8 MiB body of 3-byte lines made ~375 MiB of Python
    # objects before the line limit refused it: 47 times what the budget counts.
    import tracemalloc

    body = b"xx\n" * (settings.connectors.ingest_max_body_bytes // 3)
    with client(settings) as c:
        tracemalloc.start()
        try:
            r = c.post("/ingest", content=body, headers=AUTH)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert r.status_code == 413 and r.json()["error"] == "too_many_lines", r.text
    assert peak < 4 * len(body), f"peak {peak / 2**20:.0f} MiB for a {len(body) / 2**20:.0f} MiB body"


def test_serve_ingest_warns_when_it_listens_off_loopback_in_clear_text():
    from streams.cli.connect import ingest_exposure_warnings

    assert ingest_exposure_warnings("127.0.0.1", None) == ingest_exposure_warnings("::1", 9465) == []
    tls, metrics = ingest_exposure_warnings("0.0.0.0", None)
    assert "plain http" in tls and "TLS-terminating reverse proxy" in tls
    assert "token holders" in metrics and "--metrics-port" in metrics
    assert ingest_exposure_warnings("192.0.2.10", 9465) == [tls.replace("0.0.0.0", "192.0.2.10")]
    # behind the TLS proxy the deployments put in front, with metrics on their own port: nothing to say
    assert ingest_exposure_warnings("0.0.0.0", 9400, tls_proxy=True) == []
    assert ingest_exposure_warnings("0.0.0.0", None, tls_proxy=True) == [metrics]
