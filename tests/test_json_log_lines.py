"""With ``log_format = "json"`` (docs/settings.md: "one object per line, for
log shippers") every line a long-running command writes on stderr is one JSON
record of its log, with a level and a stable ``msg``: the worker's webhook
key warnings (hooks on different hosts sharing an HMAC key, a rotation's
retiring key unset), the desk's
"desk on" / "metrics on" lines and its plain-http warning were plain text, so
a shipper dropped exactly the key-safety warnings. With ``console`` they stay
the readable lines they were; a one-shot command (replay) keeps its readable
lines whatever the log format. A user's mistake that ends a start-up stays
the one plain ``error:`` line, last (read by the person who made it; a
shipper keeps a line that is not JSON as its text).

Each test runs the CLI as a user would, in a subprocess, with a settings file
choosing the format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from streams.broker import free_port

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "streams.cli"]
DEADLINE_S = 90  # a hang's deadline on a loaded machine, not a timing

KEY_ENV = "JSONLOG_TEST_HOOK_KEY"  # not DEEPWATCH_*: the settings loader would read it as a setting
OLD_KEY_ENV = "JSONLOG_TEST_OLD_HOOK_KEY"  # the retiring key, left unset
SHARED = "webhooks on different hosts share an HMAC key"
UNSET_OLD = "a webhook's previous_secret_env is not set"


def _settings(tmp_path: Path, log_format: str) -> Path:
    """Two hooks on two hosts signing with one key, the first in a rotation
    whose retiring key's variable is unset: both warnings at start."""
    path = tmp_path / f"settings-{log_format}.toml"
    path.write_text(f'''log_format = "{log_format}"
[alerts]
allow_private_webhooks = true
[[alerts.webhooks]]
url = "http://127.0.0.1:{free_port()}/a"
secret_env = "{KEY_ENV}"
previous_secret_env = "{OLD_KEY_ENV}"
[[alerts.webhooks]]
url = "http://localhost:{free_port()}/b"
secret_env = "{KEY_ENV}"
''')
    return path


def _env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_") and k != OLD_KEY_ENV}
    return {**base, "PYTHONPATH": str(REPO), KEY_ENV: "one-key-for-both"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, env=_env(), cwd=REPO,
                          stdin=subprocess.DEVNULL)


def _records(stderr: str, *, error: str | None = None) -> list[dict]:
    """Every stderr line as a JSON object; the test fails on the first line that is not one.
    ``error``: the last line is instead the plain ``error:`` line of a start-up mistake, holding this."""
    out = []
    lines = stderr.splitlines()
    if error is not None:
        assert lines and lines[-1].startswith("error: ") and error in lines[-1], stderr
        lines = lines[:-1]
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            raise AssertionError(f"a plain line in a JSON log: {line!r}\n--- stderr:\n{stderr}") from None
        assert isinstance(doc, dict) and {"ts", "level", "logger", "msg"} <= doc.keys(), line
        out.append(doc)
    return out


def _one(records: list[dict], msg: str) -> dict:
    found = [r for r in records if r["msg"] == msg]
    assert len(found) == 1, (msg, records)  # once: not as text and then again as a record
    return found[0]


def _closed_port() -> int:
    return free_port()  # nothing listens there: the broker check fails at once


# -- worker ------------------------------------------------------------------------------------------------------

def test_worker_key_warnings_are_json_records_before_its_start_up_error(tmp_path):
    r = _cli("worker", "--broker", f"kafka://127.0.0.1:{_closed_port()}", "-d", str(tmp_path / "data"),
             "-c", str(_settings(tmp_path, "json")))
    assert r.returncode == 2, (r.returncode, r.stderr)  # the exit status of a start-up error, as before
    records = _records(r.stderr, error="cannot reach the Kafka broker")
    shared = _one(records, SHARED)
    assert shared["level"] == "warning"
    assert KEY_ENV in shared["detail"] and "127.0.0.1" in shared["detail"] and "localhost" in shared["detail"]
    unset = _one(records, UNSET_OLD)
    assert unset["level"] == "warning" and OLD_KEY_ENV in unset["detail"] and "alerts.webhooks[0]" in unset["detail"]


def test_worker_with_console_logs_keeps_the_readable_lines(tmp_path):
    r = _cli("worker", "--broker", f"kafka://127.0.0.1:{_closed_port()}", "-d", str(tmp_path / "data"),
             "-c", str(_settings(tmp_path, "console")))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["warning", "warning", "error"], r.stderr
    assert lines[0].startswith("warning: webhooks on 2 hosts (") and f"share the HMAC key in {KEY_ENV}" in lines[0]
    assert lines[1].startswith("warning: alerts.webhooks[0] (") and f"names {OLD_KEY_ENV}, which is not set" in lines[1]
    assert lines[2].startswith("error: cannot reach the Kafka broker at 127.0.0.1:")
    assert not any(ln.startswith("{") for ln in lines), r.stderr


def test_a_one_shot_replay_keeps_its_readable_lines_under_json_logs(tmp_path):
    # replay is read by a person, between progress bars: log_format is the workers' log, not its own
    feed = tmp_path / "empty.jsonl"
    feed.write_text("")
    r = _cli("replay", str(feed), "-d", str(tmp_path / "data"), "-c", str(_settings(tmp_path, "json")))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["warning", "warning", "error"], r.stderr
    assert "is empty" in lines[2]


# -- serve (the desk) --------------------------------------------------------------------------------------------

class _Running:
    """A long-running command (``args``) in a subprocess, its stderr read line by line as it comes."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=REPO, env={**_env(), **(env or {})})
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stderr.readline, "")),
                                       daemon=True)
        self.reader.start()

    def wait_for(self, what: str, check) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not check(list(self.lines)):
            if self.proc.poll() is not None:
                self.reader.join(10)
                raise AssertionError(f"it ended ({self.proc.returncode}) before {what}: {''.join(self.lines)}")
            assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S}s: {''.join(self.lines)}"
            time.sleep(0.1)

    def stop(self) -> str:
        """SIGTERM, as a supervisor stops it; all it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.reader.join(30)
        return "".join(self.lines)


def _desk(tmp_path: Path, log_format: str, host: str = "127.0.0.1") -> _Running:
    """``deepwatch serve`` on free ports over a small findings store."""
    from tests.desk_support import small_store

    data = tmp_path / "desk"
    data.mkdir()
    small_store(data)
    return _Running("serve", "-d", str(data), "--host", host, "--port", "0", "--metrics-port", "0",
                    "-c", str(_settings(tmp_path, log_format)))


def _has_msg(msg: str):
    """Whether ``msg``'s record was written, or a plain line (which ``_records`` then shows)."""
    def check(lines: list[str]) -> bool:
        return any(f'"msg": "{msg}"' in ln or not ln.startswith("{") for ln in lines)
    return check


def test_serve_start_up_lines_and_warnings_are_json_records(tmp_path):
    # 0.0.0.0: the plain-http warning is given too (the desk's own, serve.py)
    desk = _desk(tmp_path, "json", host="0.0.0.0")
    try:
        desk.wait_for("the metrics record", _has_msg("metrics listening"))
        records = _records("".join(desk.lines))
        on = _one(records, "desk listening")
        assert on["level"] == "info" and on["port"] > 0 and on["url"] == f"http://0.0.0.0:{on['port']}/"
        assert on["detail"].startswith(f"desk on {on['url']} (API docs at /docs); data in ")
        assert on["data_dir"] == str(tmp_path / "desk")
        health = httpx.get(f"http://127.0.0.1:{on['port']}/healthz", timeout=30)
        assert health.json() == {"status": "ok"}
        metrics = _one(records, "metrics listening")
        assert metrics["url"] == f"http://0.0.0.0:{metrics['port']}/metrics"
        assert httpx.get(f"http://127.0.0.1:{metrics['port']}/metrics", timeout=30).status_code == 200
    finally:
        said = desk.stop()
    records = _records(said)  # to the last line, the stop included
    assert _one(records, SHARED)["level"] == "warning"
    assert _one(records, UNSET_OLD)["level"] == "warning"
    plain = _one(records, "desk served over plain http off loopback")
    assert plain["level"] == "warning" and "over plain http" in plain["detail"], plain
    assert records.index(plain) < records.index(_one(records, "desk listening"))


def test_serve_with_console_logs_keeps_the_readable_lines(tmp_path):
    desk = _desk(tmp_path, "console")
    try:
        desk.wait_for("the 'metrics on' line", lambda lines: any(ln.startswith("metrics on ") for ln in lines))
    finally:
        said = desk.stop()
    lines = said.splitlines()
    desk_on = [ln for ln in lines if ln.startswith("desk on http://127.0.0.1:")]
    assert len(desk_on) == 1 and "(API docs at /docs); data in " in desk_on[0], said
    assert sum(ln.startswith("metrics on http://127.0.0.1:") for ln in lines) == 1, said
    assert sum(ln.startswith("warning: webhooks on 2 hosts") for ln in lines) == 1, said
    assert sum(ln.startswith("warning: alerts.webhooks[0]") for ln in lines) == 1, said
    assert not any(ln.startswith("{") for ln in lines), said


def test_serves_fatal_start_up_error_stays_one_plain_line(tmp_path):
    # no findings yet: the desk refuses to start (exit 2, as before) with the one readable line, last;
    # before it only the settings' warnings, as records
    r = _cli("serve", "-d", str(tmp_path / "nothing"), "--port", "0", "-c", str(_settings(tmp_path, "json")))
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert {rec["msg"] for rec in _records(r.stderr, error="no findings")} == {SHARED, UNSET_OLD}


# -- serve-ingest -------------------------------------------------------------------------------------------------

def test_serve_ingest_exposure_warnings_and_its_stop_are_json_records(tmp_path):
    # off loopback, /metrics on the main port: two warnings at start; SIGTERM's "terminated" was a plain line too
    ingest = _Running("serve-ingest", "--host", "0.0.0.0", "--port", str(free_port()),
                      "--broker", f"kafka://127.0.0.1:{_closed_port()}", "-c", str(_settings(tmp_path, "json")),
                      env={"DEEPWATCH_INGEST_TOKENS": "tipline:" + "t" * 32})
    try:
        ingest.wait_for("the listening record", _has_msg("ingest endpoint listening"))
    finally:
        said = ingest.stop()
    assert ingest.proc.returncode == 130, (ingest.proc.returncode, said)  # SIGTERM's exit status, as before
    records = _records(said)
    exposed = [r for r in records if r["msg"] == "ingest endpoint exposed off loopback"]
    assert [r["level"] for r in exposed] == ["warning", "warning"], records
    assert "over plain http" in exposed[0]["detail"] and "--metrics-port" in exposed[1]["detail"]
    assert records[-1]["msg"] == "terminated" and records[-1]["level"] == "info", records


# -- connectors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("log_format", ["json", "console"])
def test_connector_warning_and_end_report_follow_the_log_format(tmp_path, log_format):
    # a collection without posts: a warning at start; the stream's counts when it stops (--duration),
    # connected to a loopback Jetstream that sends nothing (a quiet stream: exit 0)
    from tests.connector_servers import JetstreamServer

    with JetstreamServer([]) as server:
        r = _cli("connect", "bluesky", "--dry-run", "--duration", "2", "--collections", "app.bsky.feed.like",
                 "--jetstream-url", server.url, "-d", str(tmp_path / "data"), "-c", str(_settings(tmp_path, log_format)))
    assert server.requests, "the connector never reached the loopback Jetstream"
    assert r.returncode == 0, (r.returncode, r.stderr)
    if log_format == "console":
        lines = r.stderr.splitlines()
        assert sum(ln.startswith("warning: --collections leaves out app.bsky.feed.post") for ln in lines) == 1
        assert any(ln.startswith("bluesky@app.bsky.feed.like: nothing read") for ln in lines), r.stderr
        assert not any(ln.startswith("{") for ln in lines), r.stderr
        return
    records = _records(r.stderr)
    warning = _one(records, "--collections leaves out posts")
    assert warning["level"] == "warning" and warning["collections"] == ["app.bsky.feed.like"]
    ended = _one(records, "connector stream ended")
    assert ended["level"] == "info" and ended["stream"] == "bluesky@app.bsky.feed.like" and ended["counts"] == {}, ended
