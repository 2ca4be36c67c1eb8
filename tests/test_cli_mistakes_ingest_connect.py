"""CLI mistakes met by `deepwatch ingest`, `connect mastodon`, `grafana
provision`, `detect` and `serve`: each is one ``error:`` (or ``warning:``)
line naming the fix, and no input keeps a command from stopping on a signal."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "streams.cli.__main__"]
DEADLINE_S = 90  # generous: CI is loaded; a hang fails on it, nothing is timed


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def deepwatch(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, env=env or _env(),
                          cwd=cwd or REPO, stdin=subprocess.DEVNULL)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The run ended on exactly one ``error:`` line, exit 2, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _wait_for(what: str, check, proc: subprocess.Popen | None = None, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {deadline_s}s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


# -- ingest: a device is refused; an endless or silent feed stops on a signal -------------------------------------

def test_ingest_refuses_a_device_as_its_feed():
    # /dev/zero passed (only a regular file was looked into first) and was read
    # as one endless line at 100% CPU, SIGTERM ignored.
    line = one_error_line(deepwatch("ingest", "/dev/zero", "--broker", "kafka://127.0.0.1:1"))
    assert "/dev/zero is a device, not a regular file" in line and "deepwatch ingest /dev/stdin" in line, line


@pytest.fixture
def broker(tmp_path):
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.settings import Settings
    from streams.topics import topic_specs

    settings = Settings(topic_prefix="mistakes")
    with EmbeddedBroker(tmp_path / "broker") as b:
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        yield b, settings


def _ingest_stdin(broker_url: str, stdin) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "ingest", "/dev/stdin", "--broker", broker_url], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env(DEEPWATCH_TOPIC_PREFIX="mistakes"))


def _bytes_read(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stops_on(proc: subprocess.Popen, signum: int) -> str:
    """Send ``signum``; the command must end with exit 130 and say how far
    the feed got (the deadline is a hang's, not a timing)."""
    proc.send_signal(signum)
    try:
        proc.wait(DEADLINE_S)  # not communicate(): closing its stdin would end a piped feed, and the hang with it
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise AssertionError(f"ingest ignored signal {signum}: still running {DEADLINE_S}s later") from None
    stderr = proc.stderr.read()
    assert proc.returncode == 130 and "Traceback" not in stderr, (proc.returncode, stderr)
    assert any(line.startswith("interrupted: ") for line in stderr.splitlines()), stderr
    return stderr


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/PID/io to see the feed being read")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_endless_line_piped_in_stops_on_a_signal(broker, signum):
    # `cat /dev/zero | deepwatch ingest /dev/stdin`: the rest of the over-long
    # line was read and dropped with Ctrl-C and SIGTERM held, for ever.
    b, _ = broker
    zeros = subprocess.Popen(["cat", "/dev/zero"], stdout=subprocess.PIPE)
    proc = _ingest_stdin(b.url, zeros.stdout)
    zeros.stdout.close()  # ingest holds the read end now
    try:
        # well past the first 1 MB (the line kept to be refused): dropping the rest
        _wait_for("reading past the first megabyte", lambda: _bytes_read(proc.pid) > 16 << 20, proc)
        _stops_on(proc, signum)
    finally:
        _stop(proc)
        zeros.kill()
        zeros.wait(30)


def test_a_pipe_whose_writer_went_quiet_stops_on_sigterm(broker):
    # A blocking read of the pipe went on through a held SIGTERM: a feed whose
    # writer sends nothing more (a tail -f, a stalled scraper) kept the command.
    from tests.connector_servers import read_topic

    b, settings = broker
    proc = _ingest_stdin(b.url, subprocess.PIPE)
    try:
        event = {"schema_version": 1, "event_id": "quiet-1", "platform": "x", "account_id": "a",
                 "posted_at": "2026-11-30T10:00:00Z", "image": {"url": "https://x.org/1.jpg"}}
        proc.stdin.write(json.dumps(event) + "\n")
        proc.stdin.flush()  # and the pipe stays open, silent
        # the event in the topic: ingest is past start-up, in its send loop, waiting on the pipe
        assert len(read_topic(b.bootstrap, settings.topic("events"), 1, timeout_s=DEADLINE_S)) == 1
        _stops_on(proc, signal.SIGTERM)
    finally:
        _stop(proc)


def test_a_fifo_nobody_writes_to_stops_on_sigterm(broker, tmp_path):
    # Opening a FIFO waits for a writer; with SIGTERM held it waited through it.
    b, _ = broker
    fifo = tmp_path / "feed.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*CLI, "ingest", str(fifo), "--broker", b.url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(DEEPWATCH_TOPIC_PREFIX="mistakes"))

    def fifo_open() -> bool:  # the feed is opened in the send loop, signals held
        try:
            return any(os.path.realpath(f"/proc/{proc.pid}/fd/{fd}") == str(fifo.resolve())
                       for fd in os.listdir(f"/proc/{proc.pid}/fd"))
        except OSError:
            return False

    try:
        if Path("/proc/self/fd").is_dir():
            _wait_for("the FIFO open", fifo_open, proc)
        _stops_on(proc, signal.SIGTERM)
    finally:
        _stop(proc)


@pytest.mark.parametrize("content", [
    b"",
    b"a\nbb\n\n  c  \r\nlast without newline",
    b"x" * 40 + b"\nshort\n" + b"y" * 16 + b"\n" + b"z" * 15 + b"\r\n" + b"w" * 15 + b"\r" + b"\n" + b"tail",
    b"\n".join(b"%d" % i * (i % 37) for i in range(400)),
    b"q" * 300_000 + b"\nafter\n",
])
def test_lines_read_from_a_pipe_are_the_lines_read_from_a_file(tmp_path, content):
    # The pipe reader (non-blocking, for signals) splits lines as the file
    # reader does: over-long lines, a CRLF cut at the limit, no final newline.
    from streams.ingest import iter_lines_at

    path = tmp_path / "feed.jsonl"
    path.write_bytes(content)
    expected = [line for _, line in iter_lines_at(path, limit=16)]
    ticks = []
    read, write = os.pipe()

    def feed() -> None:
        with os.fdopen(write, "wb") as w:
            for i in range(0, len(content), 7919):  # odd chunks: lines cut across reads
                w.write(content[i:i + 7919])
                w.flush()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        got = list(iter_lines_at(Path(f"/proc/self/fd/{read}"), limit=16, tick=lambda: ticks.append(1)))
    finally:
        os.close(read)
        writer.join(30)
    assert [line for _, line in got] == expected
    assert all(at == -1 for at, _ in got)
    assert ticks  # the reader handed over to the caller between reads


# -- connect mastodon --instance ------------------------------------------------------------------------------------

@pytest.mark.parametrize("instance, says, example", [
    ("ftp://x", "ftp:// is not an instance's address", "e.g. https://x"),
    ("wss://m.example", "wss:// is not an instance's address", "e.g. https://m.example"),
    ("https://", "has no host", "e.g. https://mastodon.social"),
    ("mastodon.social", "is not a URL", "e.g. https://mastodon.social"),
])
def test_mastodon_instance_names_the_wrong_scheme_or_missing_host(tmp_path, instance, says, example):
    # "--instance must be a URL such as https://ftp://x"; "https://" was taken
    # and retried for ever.
    r = deepwatch("connect", "mastodon", "--instance", instance, "--dry-run", "--duration", "5",
                  "--data-dir", str(tmp_path))
    line = one_error_line(r)
    assert f"--instance {instance!r}" in line and says in line and example in line, line
    assert "https://ftp://" not in line and "https://wss://" not in line, line


# -- grafana provision against something that is not Grafana -------------------------------------------------------

class _NotGrafana(http.server.BaseHTTPRequestHandler):
    """A plain web server: every path a 404 page in HTML, or (``page``) a 200 web page."""

    page = False

    def do_GET(self) -> None:
        if self.page:
            body = b"<!DOCTYPE html>\n<html><head><title>Home</title><style>p{}</style></head>\n<body>\n" \
                   b"<h1>Welcome</h1>\n<p>Tom &amp; Jerry</p>\n</body></html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)  # http.server's own multi-line HTML error page

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("page", [False, True], ids=["404-html", "200-web-page"])
def test_grafana_provision_against_a_plain_web_server_is_one_line_with_the_hint(page):
    # "Grafana refused the request: Client Error 404: <!DOCTYPE HTML>" and a
    # dozen lines of HTML, without the "is the URL Grafana's" hint.
    handler = type("Handler", (_NotGrafana,), {"page": page})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = deepwatch("grafana", "provision", "--url", f"http://127.0.0.1:{server.server_port}", "--token", "t")
    finally:
        server.shutdown()
        server.server_close()
    line = one_error_line(r)
    assert "is the URL Grafana's own address" in line, line
    assert "<" not in line and ">" not in line and len(line) < 400, line
    if page:
        assert "Welcome Tom & Jerry" in line and "p{}" not in line, line
    else:
        assert "HTTP 404" in line and "Nothing matches the given URI" in line, line


def test_a_long_grafana_answer_is_cut_to_a_bounded_excerpt():
    from dashboards.publish import EXCERPT_CHARS, excerpt

    text = "<div>\n" + "word " * 500 + "</div>"
    cut = excerpt(text)
    assert len(cut) <= EXCERPT_CHARS and cut.startswith("word word") and cut.endswith("…") and "\n" not in cut


# -- detect: the warning's one line; detect.device and --config ----------------------------------------------------

@pytest.fixture
def picture(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "pic.png"
    Image.new("RGB", (64, 48), (120, 30, 200)).save(path)
    return path


def test_a_configured_model_that_does_not_load_is_one_warning_line(tmp_path, picture):
    # A plain Console wrapped the warning at 80 columns: five lines in a log.
    r = deepwatch("detect", str(picture), "--data-dir", str(tmp_path / "data"),
                  env=_env(DEEPWATCH_DETECT__MODELS='["nosuch"]', COLUMNS="80"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warning = [line for line in r.stderr.splitlines() if "nosuch" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: model 'nosuch' from detect.models not loaded"), r.stderr
    assert warning[0].rstrip().endswith("(--no-models to skip models)"), r.stderr
    assert json.loads(r.stdout)[0]["verdict"] is not None


MPS_WARNING = "device 'mps' requested but MPS is not available"


@pytest.mark.skipif(sys.platform == "darwin", reason="asks for MPS: a device only Macs have")
def test_detect_uses_the_detect_device_setting_unless_device_is_given(tmp_path, picture):
    # --device defaulted to auto: DEEPWATCH_DETECT__DEVICE and the TOML's
    # detect.device were never used by `deepwatch detect`, nor had it --config.
    data = str(tmp_path / "data")
    r = deepwatch("detect", str(picture), "--data-dir", data, env=_env(DEEPWATCH_DETECT__DEVICE="mps"))
    assert r.returncode == 0 and MPS_WARNING in r.stderr, r.stderr  # the packaged model loaded on the setting's device
    r = deepwatch("detect", str(picture), "--data-dir", data, "--device", "cpu", env=_env(DEEPWATCH_DETECT__DEVICE="mps"))
    assert r.returncode == 0 and MPS_WARNING not in r.stderr, r.stderr  # --device given: it wins
    toml = tmp_path / "settings.toml"
    toml.write_text('[detect]\ndevice = "mps"\n')
    r = deepwatch("detect", str(picture), "--data-dir", data, "--config", str(toml))
    assert r.returncode == 0 and MPS_WARNING in r.stderr, r.stderr
    r = deepwatch("detect", str(picture), "--data-dir", data, "-c", str(toml), "--device", "cpu")
    assert r.returncode == 0 and MPS_WARNING not in r.stderr, r.stderr
    # a --device given is still checked as before
    line = one_error_line(deepwatch("detect", str(picture), "--data-dir", data, "--device", "cdua"))
    assert "--device 'cdua' is not one of" in line, line


# -- serve: "desk on" only once the desk listens -------------------------------------------------------------------

def test_serve_with_its_metrics_port_taken_does_not_say_the_desk_is_on(tmp_path):
    from tests.desk_support import small_store

    small_store(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = deepwatch("serve", "--data-dir", str(tmp_path), "--port", "0", "--metrics-port", str(port))
    line = one_error_line(r)
    assert f"metrics port {port} is in use" in line and "desk on" not in r.stderr, r.stderr


def test_serve_says_desk_on_with_the_port_it_listens_on(tmp_path):
    # --port 0 said "desk on http://127.0.0.1:0/", before anything listened.
    import httpx

    from tests.desk_support import small_store

    small_store(tmp_path)
    # console: the readable lines (in a JSON log they are records, tests/test_json_log_lines.py)
    proc = subprocess.Popen([*CLI, "serve", "--data-dir", str(tmp_path), "--port", "0", "--metrics-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env(DEEPWATCH_LOG_FORMAT="console"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        _wait_for("'metrics on' line", lambda: any(ln.startswith("metrics on ") for ln in lines), proc)
        desk = next(ln for ln in lines if ln.startswith("desk on "))
        metrics = next(ln for ln in lines if ln.startswith("metrics on "))
        assert lines.index(desk) < lines.index(metrics)
        url = desk.split()[2]
        assert not url.endswith(":0/"), desk
        assert httpx.get(url + "healthz", timeout=30).json() == {"status": "ok"}
        assert httpx.get(metrics.split()[2], timeout=30).status_code == 200
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                _stop(proc)
        reader.join(30)
