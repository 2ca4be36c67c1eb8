"""Loopback stand-ins for the platforms, replaying recorded frames from
tests/frames/: a Jetstream websocket server (websockets.serve) and a Mastodon
server (SSE streaming + REST timelines) on http.server. Each runs in its own
thread so the connector under test (async, or a CLI subprocess) talks to it
over real sockets, and each records what the client asked for."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import parse_qs, urlencode, urlsplit

import websockets
from kafka import KafkaConsumer, TopicPartition

if TYPE_CHECKING:
    from streams.connectors.base import Mapped

FRAMES = Path(__file__).parent / "frames"


def jetstream_frames() -> list[str]:
    return [ln for ln in (FRAMES / "jetstream.jsonl").read_text().splitlines() if ln.strip()]


def mapped_frames(url: str, *, images_only: bool = True) -> list["Mapped"]:
    """The recorded Jetstream frames, mapped in order by one mapper and its
    repost memory (image URLs on ``url``, a template as ``BlueskyMapper``
    takes it): those that yield image events, or all of them."""
    from streams.connectors.base import ConnectorState
    from streams.connectors.bluesky import BlueskyMapper

    st = ConnectorState(":memory:")
    m = BlueskyMapper(url, recall=st.recall)
    out = []
    for f in jetstream_frames():
        r = m.map(f)
        if r.remember:
            st.remember(*r.remember)
        if r.forget:
            st.forget(r.forget)
        if r.events or not images_only:
            out.append(r)
    st.close()
    return out


def jetstream_malformed() -> list[str]:
    return [ln for ln in (FRAMES / "jetstream_malformed.txt").read_text().splitlines() if ln.strip()]


# --------------------------------------------------------------------------
# Jetstream
# --------------------------------------------------------------------------
class JetstreamServer:
    """Serves ``frames`` honouring ``cursor`` (time_us >= cursor),
    ``wantedCollections`` and ``maxMessageSizeBytes`` (larger frames are left
    out; ``honour_max_size=False`` plays a server that ignores it) like
    Jetstream. Per connection number (0-based), ``drop_after[n]`` aborts the
    TCP connection after that many frames, ``hang_after[n]`` goes silent
    (connection open, nothing sent). With ``zstd_dict`` and ``compress=true``
    frames go out as zstd binary messages."""

    def __init__(self, frames: list[str], *, drop_after: dict[int, int] | None = None,
                 hang_after: dict[int, int] | None = None, zstd_dict: bytes | None = None,
                 honour_max_size: bool = True, refuse: dict[int, tuple[int, dict[str, str]]] | None = None):
        self.frames = frames
        # handshake n (0-based) -> (HTTP status, headers): the upgrade is refused with them
        self.refuse = refuse or {}
        self.handshakes: list[float] = []  # when each handshake came (time.monotonic())
        self.drop_after = drop_after or {}
        self.hang_after = hang_after or {}
        self.zstd_dict = zstd_dict
        self.honour_max_size = honour_max_size
        self.requests: list[dict[str, list[str]]] = []
        self.sent: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = None
        self.url = ""

    def _position(self) -> list[int]:
        # Malformed frames have no time_us: they sit at their predecessor's position.
        pos, out = 0, []
        for f in self.frames:
            try:
                pos = int(json.loads(f)["time_us"])
            except Exception:
                pass
            out.append(pos)
        return out

    async def _handler(self, ws) -> None:
        n = len(self.requests)
        qs = parse_qs(urlsplit(ws.request.path).query)
        self.requests.append(qs)
        cursor = int(qs["cursor"][0]) if "cursor" in qs else None
        wanted = set(qs.get("wantedCollections", []))
        max_size = int(qs.get("maxMessageSizeBytes", ["0"])[0]) if self.honour_max_size else 0
        compress = qs.get("compress", ["false"])[0] == "true" and self.zstd_dict is not None
        cctx = None
        if compress:
            import zstandard

            cctx = zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(self.zstd_dict))
        sent = 0
        self.sent.append(0)
        for frame, pos in zip(self.frames, self._position()):
            if cursor is not None and pos < cursor:
                continue
            try:
                doc = json.loads(frame)
                coll = (doc.get("commit") or {}).get("collection")
                if wanted and coll and coll not in wanted:
                    continue
            except Exception:
                pass
            if max_size and len(frame.encode()) > max_size:
                continue
            if self.drop_after.get(n) == sent:
                ws.transport.abort()
                return
            if self.hang_after.get(n) == sent:
                await ws.wait_closed()
                return
            await ws.send(cctx.compress(frame.encode()) if cctx else frame)
            sent += 1
            self.sent[n] = sent
        await ws.wait_closed()  # a live stream with nothing new: idle until the client leaves

    def __enter__(self) -> "JetstreamServer":
        self._thread.start()

        def process_request(connection, request):
            n = len(self.handshakes)
            self.handshakes.append(time.monotonic())
            if n in self.refuse:
                status, headers = self.refuse[n]
                response = connection.respond(status, f"HTTP {status}\n")
                for k, v in headers.items():
                    response.headers[k] = v
                return response
            return None

        async def start():
            return await websockets.serve(self._handler, "127.0.0.1", 0, process_request=process_request)

        self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/subscribe"
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# --------------------------------------------------------------------------
# Mastodon
# --------------------------------------------------------------------------
def sse_events(path: Path) -> list[str]:
    """Split a recorded SSE transcript into its blocks (events and comments)."""
    return [b + "\n\n" for b in path.read_text().split("\n\n") if b.strip()]


@dataclass
class MastodonScript:
    """What the fake instance does. ``streams[n]`` is the list of SSE blocks
    connection n receives; after them it either drops (``drop``) or idles
    silently (a dead server behind a live socket). ``statuses`` is every
    status the REST timelines know."""

    streams: list[list[str]]
    statuses: list[dict] = field(default_factory=list)
    drop: bool = True
    token: str | None = None
    send_ids: bool = False  # SSE id: lines and Last-Event-ID replay (Mastodon itself sends none)
    rate_limit_first: bool = False  # the first REST call answers 429 with a reset 1 s ahead
    silent_idle_s: float = 30.0
    stream_answers: dict[int, tuple[int, dict]] = field(default_factory=dict)  # connection n -> (status, headers)
    instance_body: bytes | None = None  # /api/v1/instance answers this (JSON content type) instead of its document
    timeline_body: bytes | None = None  # the REST timelines answer this instead of their page
    prev_link: str | None = None  # the REST timelines' Link rel="prev" names this URL instead of their own
    instance_answers: dict[int, int] = field(default_factory=dict)  # /api/v1/instance call n -> this HTTP error
    streaming_api: str | None = None  # the instance document's urls.streaming_api instead of this server's ws:// URL
    no_streaming: bool = False  # /api/v1/streaming/* answers 404 (it is served elsewhere: streaming_api)
    timeline_silent_s: float = 0.0  # the REST timelines say nothing for this long before answering
    timeline_answer: int | None = None  # the REST timelines answer this HTTP error (401: no public preview)


class MastodonServer:
    def __init__(self, script: MastodonScript):
        self.script = script
        self.stream_requests: list[dict] = []
        self.rest_requests: list[str] = []
        self.instance_requests = 0
        self._rest_calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):  # keep test output quiet
                pass

            def _json(self, doc, status=200, headers=None):
                body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                parts = urlsplit(self.path)
                qs = parse_qs(parts.query)
                auth = self.headers.get("Authorization")
                if outer.script.token and auth != f"Bearer {outer.script.token}":
                    return self._json({"error": "The access token is invalid"}, 401)
                if parts.path == "/api/v1/instance":
                    n = outer.instance_requests
                    outer.instance_requests += 1
                    if n in outer.script.instance_answers:
                        status = outer.script.instance_answers[n]
                        return self._json(f"upstream answered {status}".encode(), status)
                    if outer.script.instance_body is not None:
                        return self._json(outer.script.instance_body)
                    streaming = outer.script.streaming_api or f"ws://127.0.0.1:{outer.port}"
                    return self._json({"uri": "mastodon.example", "version": "4.3.2",
                                       "urls": {"streaming_api": streaming}})
                if parts.path.startswith("/api/v1/streaming/") and outer.script.no_streaming:
                    return self._json({"error": "Record not found"}, 404)
                if parts.path.startswith("/api/v1/streaming/"):
                    return self._stream(parts.path, qs)
                if parts.path.startswith("/api/v1/timelines/"):
                    return self._timeline(parts.path, qs)
                return self._json({"error": "Record not found"}, 404)

            def _stream(self, path, qs):
                n = len(outer.stream_requests)
                outer.stream_requests.append({"path": path, "qs": qs,
                                              "last_event_id": self.headers.get("Last-Event-ID")})
                if n in outer.script.stream_answers:
                    status, headers = outer.script.stream_answers[n]
                    return self._json({"error": f"HTTP {status}"}, status, headers)
                blocks = outer.script.streams[min(n, len(outer.script.streams) - 1)]
                if outer.script.send_ids:
                    blocks = [f"id: {i}\n{b}" for i, b in enumerate(blocks)]
                    last = self.headers.get("Last-Event-ID")
                    if last is not None:  # replay what the client missed, as an SSE server with ids would
                        everything = [f"id: {i}\n{b}" for i, b in enumerate(sum(outer.script.streams, []))]
                        blocks = everything[int(last) + 1:]
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                try:
                    for b in blocks:
                        self.wfile.write(b.encode())
                        self.wfile.flush()
                    if not outer.script.drop or n >= len(outer.script.streams) - 1:
                        time.sleep(outer.script.silent_idle_s)  # the live stream goes quiet
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _timeline(self, path, qs):
                outer.rest_requests.append(self.path)
                outer._rest_calls += 1
                if outer.script.timeline_silent_s:
                    time.sleep(outer.script.timeline_silent_s)  # an instance that accepted and says nothing
                    return
                if outer.script.timeline_answer is not None:
                    return self._json({"error": "This method requires an authenticated user"},
                                      outer.script.timeline_answer)
                reset = (datetime.now(timezone.utc) + timedelta(seconds=1)).isoformat()
                if outer.script.rate_limit_first and outer._rest_calls == 1:
                    return self._json({"error": "Too many requests"}, 429,
                                      {"X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "0",
                                       "X-RateLimit-Reset": reset})
                statuses = outer.script.statuses
                if path.startswith("/api/v1/timelines/tag/"):
                    tag = path.rsplit("/", 1)[1].lower()
                    statuses = [s for s in statuses if tag in {t["name"].lower() for t in s.get("tags", [])}]
                min_id = int(qs.get("min_id", ["0"])[0])
                limit = min(40, int(qs.get("limit", ["20"])[0]))
                newer = sorted((s for s in statuses if int(s["id"]) > min_id), key=lambda s: int(s["id"]))[:limit]
                page = list(reversed(newer))
                headers = {"X-RateLimit-Limit": "300", "X-RateLimit-Remaining": "299", "X-RateLimit-Reset": reset}
                if page:
                    base = f"http://127.0.0.1:{outer.port}{path}"
                    prev = outer.script.prev_link or f"{base}?{urlencode({'min_id': page[0]['id']})}"
                    headers["Link"] = (f'<{base}?{urlencode({"max_id": page[-1]["id"]})}>; rel="next", '
                                       f'<{prev}>; rel="prev"')
                if outer.script.timeline_body is not None:
                    return self._json(outer.script.timeline_body, 200, headers)
                return self._json(page, 200, headers)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "MastodonServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class ImageServer:
    """Serves ``{path: bytes}`` on loopback (the CDN / media host stand-in).
    ``before_answer``: called in each request's thread before it is answered
    (a slow host)."""

    def __init__(self, images: dict[str, bytes], before_answer: Callable[[], Any] | None = None):
        self.images = images
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.hits.append(self.path)
                if before_answer is not None:
                    before_answer()
                body = outer.images.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png" if body.startswith(b"\x89PNG") else "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def read_topic(bootstrap: str, topic: str, expect: int, timeout_s: float = 15) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expect and time.monotonic() < deadline:
            out += [m.value for m in consumer]
        return out
    finally:
        consumer.close()


class DripServer:
    """A server that answers every connection with ``head`` and then ``drip``,
    one byte every ``every_s`` (cycling), until the client leaves: a response
    head, a streamed event or a REST page that never ends while bytes keep
    coming, so no read ever times out. Counts its connections."""

    def __init__(self, head: bytes, drip: bytes, every_s: float = 0.2):
        import socket

        self.head, self.drip, self.every_s = head, drip, every_s
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import socket

        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:
        try:
            conn.recv(65536)  # the request (one read is enough for a GET)
            conn.sendall(self.head)
            i = 0
            while not self._stop.is_set():
                conn.sendall(self.drip[i % len(self.drip):i % len(self.drip) + 1])
                i += 1
                time.sleep(self.every_s)
        except OSError:
            pass
        finally:
            conn.close()

    def __enter__(self) -> "DripServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)


# --------------------------------------------------------------------------
# atproto identity: the PLC directory, did:web hosts and handle hosts
# --------------------------------------------------------------------------
def plc_document(did: str, handle: str | None, *, extra_aka: list[str] | None = None,
                 pds: str = "https://morel.us-east.host.bsky.network") -> dict:
    """A DID document as the PLC directory serves it (``GET /{did}``): the
    shape of plc.directory's answers (@context, alsoKnownAs, a Multikey
    verification method, the PDS service)."""
    return {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1",
                     "https://w3id.org/security/suites/secp256k1-2019/v1"],
        "id": did,
        "alsoKnownAs": ([f"at://{handle}"] if handle else []) + list(extra_aka or []),
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did,
                                "publicKeyMultibase": "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }


@dataclass
class Answer:
    """One route of an ``IdentityServer``: a status and body, sent after
    ``delay_s``; with ``drip_s`` the body goes out one byte per ``drip_s``
    (a server that keeps every read alive); ``length`` overrides the
    Content-Length header (None: the body's; -1: none, the connection closes
    after the body)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drip_s: float = 0.0
    length: int | None = None


def json_answer(doc: Any) -> Answer:
    return Answer(body=json.dumps(doc).encode(), content_type="application/did+ld+json")


def did_answer(did: str) -> Answer:
    """``/.well-known/atproto-did`` as the spec has a handle host answer it: the DID, as text/plain."""
    return Answer(body=f"{did}\n".encode(), content_type="text/plain")


class IdentityServer:
    """Serves ``routes[(host, path)]`` on ``bind`` (loopback): the PLC
    directory (``("*", "/did:plc:...")``), did:web hosts (``(HOST,
    "/.well-known/did.json")``) and handle hosts (``(HANDLE,
    "/.well-known/atproto-did")``), told apart by the Host header as the
    real ones are by name. Anything else is 404. ``hits`` records (host,
    path) of every request, in order."""

    def __init__(self, routes: dict[tuple[str, str], Answer], bind: str = "127.0.0.1"):
        self.routes = routes
        self.hits: list[tuple[str, str]] = []
        self.inflight = 0
        self.max_inflight = 0  # the most requests it was answering at once
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
                with outer._lock:
                    outer.hits.append((host, self.path))
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    self._answer(host)
                finally:
                    with outer._lock:
                        outer.inflight -= 1

            def _answer(self, host):
                a = outer.routes.get((host, self.path)) or outer.routes.get(("*", self.path)) \
                    or Answer(404, b'{"message":"DID not registered"}')
                try:
                    if a.delay_s:
                        time.sleep(a.delay_s)
                    self.send_response(a.status)
                    self.send_header("Content-Type", a.content_type)
                    if a.length == -1:  # no length: the body ends when the connection does
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    else:
                        self.send_header("Content-Length", str(len(a.body) if a.length is None else a.length))
                    for k, v in a.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    if a.drip_s:
                        for i in range(len(a.body)):
                            self.wfile.write(a.body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(a.drip_s)
                    else:
                        self.wfile.write(a.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._httpd = ThreadingHTTPServer((bind, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://{bind}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "IdentityServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
