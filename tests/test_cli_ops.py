"""Operating deepwatch from the command line: `deepwatch broker` as a
foreground service, the settings reference, and user mistakes answered with
one line that says how to fix them (never a traceback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile import corpus
from tests.support import start_broker_cli


def deepwatch(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) >= 1, r.stderr
    return lines[0]


def test_unknown_setting_is_one_line_naming_the_closest(tmp_path):
    r = deepwatch("clusters", "--data-dir", str(tmp_path), env={"DEEPWATCH_FETCH__IMAGE_ROOTS": "[]"})
    assert "DEEPWATCH_INGEST__IMAGE_ROOTS" in one_line_error(r)


def test_broken_settings_file_is_one_line_not_a_traceback(tmp_path):
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text("[fetch\n")
    r = deepwatch("clusters", "--data-dir", str(tmp_path), "--config", str(cfg))
    assert r.returncode != 0 and "not valid TOML" in one_line_error(r)


def test_desk_user_without_a_terminal_says_how_to_give_the_password(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", "desk-user", "ana", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Aborted" not in r.stderr
    assert "--password-env" in r.stderr
    assert not (tmp_path / "desk-users.json").exists()


def test_unreachable_broker_is_one_line_with_the_address(tmp_path):
    from streams.broker import free_port

    port = free_port()
    feed = tmp_path / "f.jsonl"
    feed.write_text("{}\n")
    line = one_line_error(deepwatch("ingest", str(feed), "--broker", f"kafka://127.0.0.1:{port}", timeout=30))
    assert f"127.0.0.1:{port}" in line and "deepwatch broker" in line
    r = deepwatch("worker", "--broker", "kafka://127.0.0.1:99999", "--data-dir", str(tmp_path), timeout=30)
    assert "99999" in one_line_error(r)


def test_bad_model_url_and_unknown_model_are_one_line(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(corpus.picture_png(1, (64, 64)))
    line = one_line_error(deepwatch("models", "fetch", "npr", "--url", "https://nonexistent.invalid/w.safetensors",
                                    "--data-dir", str(tmp_path), timeout=60))
    assert "nonexistent.invalid" in line
    line = one_line_error(deepwatch("detect", str(img), "--model", "nosuch", env={"DEEPWATCH_DATA_DIR": str(tmp_path)}))
    assert "nosuch" in line and "models fetch" in line


def test_eval_with_nothing_to_evaluate_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "empty" in one_line_error(deepwatch("eval", str(tmp_path / "empty")))
    # a misspelt variant is named, not silently scored as a re-post
    assert "not one of original, reposted" in one_line_error(deepwatch("eval", str(tmp_path / "empty"), "--variant", "repost"))
    assert "--format is json or table" in one_line_error(deepwatch("eval", str(tmp_path / "empty"), "--format", "yaml"))


def test_bank_add_names_the_bad_file_and_adds_nothing_or_the_rest(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(corpus.picture_png(2, (64, 64)))
    bad.write_bytes(b"not a picture")
    data = str(tmp_path / "data")
    r = deepwatch("bank", "add", "b", str(good), str(bad), "--verdict", "fake", "-d", data)
    assert "bad.png" in one_line_error(r) and "nothing added" in r.stderr and "--skip-bad" in r.stderr
    r = deepwatch("bank", "list", "-d", data, "--format", "json")
    assert r.returncode == 0 and '"b"' not in r.stdout
    r = deepwatch("bank", "add", "b", str(good), str(bad), "--verdict", "fake", "-d", data, "--skip-bad")
    assert r.returncode == 0 and "skipped" in r.stderr and "bad.png" in r.stderr and "added 1" in r.stderr


def test_settings_reference_command(tmp_path):
    r = deepwatch("settings", "--format", "markdown")
    assert r.returncode == 0 and "DEEPWATCH_FETCH__TOTAL_TIMEOUT_S" in r.stdout and "kafka.sasl_mechanism" in r.stdout
    r = deepwatch("settings", "--format", "json", env={"DEEPWATCH_PARTITIONS": "2"})
    assert r.returncode == 0 and '"partitions": 2' in r.stdout


@pytest.mark.slow
def test_broker_command_runs_in_the_foreground_and_prints_its_url(tmp_path):
    from kafka import KafkaAdminClient

    proc, url = start_broker_cli(tmp_path)
    try:
        admin = KafkaAdminClient(bootstrap_servers=url.removeprefix("kafka://"), client_id="t")
        try:
            assert "deepwatch.events" in admin.list_topics()  # topics are created up front
        finally:
            admin.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_worker_image_root_must_exist(tmp_path):
    r = deepwatch("worker", "--broker", "kafka://127.0.0.1:9", "--image-root", str(tmp_path / "nope"),
                  "--data-dir", str(tmp_path), timeout=30)
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def test_alerts_show_webhook_delivery_status_and_json_alias(tmp_path):
    import json
    from datetime import datetime, timezone

    from streams.findings import DeliveryState
    from streams.records import Alert, Velocity
    from streams.store import open_store

    store = open_store(tmp_path)
    alert = Alert(alert_id="c1:1", cluster_id="c1", rule="r", level=1, fake_score=0.9, verdict="likely-ai",
                  velocity=Velocity(sightings_5m=12), sightings=12, accounts=12, evidence=[],
                  at=datetime(2026, 5, 1, tzinfo=timezone.utc))
    store.add_alert(alert)
    store.mark_delivered("c1:1", "https://desk.example/hook", DeliveryState.FAILED, "HTTP 503")
    assert [a.alert_id for a in store.failed_deliveries("https://desk.example/hook")] == ["c1:1"]
    store.close()
    r = deepwatch("alerts", "--data-dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    [doc] = json.loads(r.stdout)
    assert doc["deliveries"][0]["status"] == "failed: HTTP 503"
    r = deepwatch("alerts", "--data-dir", str(tmp_path), env={"COLUMNS": "60"})
    assert r.returncode == 0 and "503" in r.stdout  # a narrow terminal wraps the column, never drops it
    r = deepwatch("alerts", "--data-dir", str(tmp_path), env={"COLUMNS": "200"})
    # each status names its target: hooks sharing a receiver's host told apart, as `deepwatch redeliver` takes them
    key = json.loads(deepwatch("alerts", "--data-dir", str(tmp_path), "--json").stdout)[0]["deliveries"][0]["target"]
    assert f"{key}: failed: HTTP 503" in r.stdout


def test_bench_needing_shared_data_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", Path(__file__).resolve().parents[1] / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    monkeypatch.setattr(run_all, "NEEDS", {"neardup.py": [tmp_path / "absent"]})
    monkeypatch.setattr(sys, "argv", ["run_all.py", "--quick", "neardup.py"])
    assert run_all.main() == 0
    out = capsys.readouterr().out
    assert "neardup.py: SKIPPED: needs" in out and "absent" in out and "1 skipped" in out


def test_replay_runs_one_pipeline_worker_per_core_up_to_the_partitions(monkeypatch):
    """Without --workers, replay runs one pipeline worker per core it may use,
    never more than the events topic has partitions (more would idle)."""
    from streams.cli.pipeline import default_workers
    from streams.settings import Settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_workers(Settings(partitions=4)) == 2
    assert default_workers(Settings(partitions=1)) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_workers(Settings(partitions=4)) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert default_workers(Settings(partitions=4)) == 1


def test_unknown_worker_role_is_a_usage_error_naming_the_roles(tmp_path):
    r = deepwatch("worker", "--role", "analyse", "--broker", "kafka://127.0.0.1:9", "--data-dir", str(tmp_path), timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    said = " ".join(r.stderr.replace("│", " ").split())
    assert "unknown role 'analyse': pipeline, analyze, cluster or detect" in said


@pytest.mark.slow
def test_demo_runs_end_to_end_as_make_demo_runs_it(tmp_path):
    # `make demo` is the README's first command: the console script, a fresh data dir, output captured as a log
    script = Path(sys.executable).with_name("deepwatch")
    if not script.exists():
        pytest.skip(f"no console script at {script} (run `make install`)")
    r = subprocess.run([str(script), "demo", "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    said = " ".join(r.stderr.split())  # rich wraps long lines off a terminal
    # 43 events: 37 sightings of 36 posts (one post twice), 6 hostile events dead-lettered, one viral fake alerted
    assert "done: 43 events" in said and "this run: 36 new sightings, 1 already stored, 6 dead letters" in said
    assert "6 clusters, 1 alert;" in said and "deepwatch clusters --data-dir" in said
    assert r.stdout.endswith("\n")  # the live table's last frame ends its line: the summary never joins it
    assert "event→alert latency of this run's alerts (s): [" in said
    alerts = deepwatch("alerts", "--data-dir", str(tmp_path / "data"), "--format", "json")
    assert alerts.returncode == 0 and len(json.loads(alerts.stdout)) == 1
    # again into the same data dir: nothing new is stored or alerted, and the first run's latency is not shown again
    r = subprocess.run([str(script), "demo", "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    said = " ".join(r.stderr.split())
    assert r.returncode == 0 and "this run: 0 new sightings, 37 already stored, 6 dead letters" in said, said[-2000:]
    assert "1 alert;" in said and "latency" not in said


@pytest.mark.parametrize("args", [
    ["replay", "feed.jsonl", "--timeout", "0"],  # timed out at once
    ["eval", "set", "--batch", "0"],  # leaked "range() arg 3 must not be zero"
    ["train", "--epochs", "0"], ["train", "--batch-size", "0"],
    ["models", "fetch", "m", "--max-mb", "0"], ["serve-ingest", "--port", "70000"], ["grafana", "provision", "--timeout", "0"],
])
def test_number_options_out_of_range_are_usage_errors(tmp_path, args):
    (tmp_path / "feed.jsonl").write_text("")
    (tmp_path / "set").mkdir()
    r = deepwatch(*args, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Invalid value for '--" in " ".join(r.stderr.split()), r.stderr[-1500:]


def test_error_lines_stay_one_line_on_a_narrow_terminal(tmp_path):
    # Commands that printed their own error (serve-ingest, connect, grafana,
    # the findings queries) let rich wrap it at the terminal's width: three
    # lines for a short token, and a urllib3 object repr for a refused port.
    narrow = {"COLUMNS": "40"}
    r = deepwatch("serve-ingest", "--broker", "kafka://127.0.0.1:1",
                  env={**narrow, "DEEPWATCH_INGEST_TOKENS": "tip:short"})
    assert r.stderr.splitlines() == [one_line_error(r)] and "shorter than 16 characters" in r.stderr
    r = deepwatch("connect", "mastodon", "--instance", "https://mastodon.example", "--broker", "kafka://127.0.0.1:1",
                  env=narrow)
    # the broker check's own message, not wrapped in a second "cannot reach the broker"
    assert r.stderr.splitlines() == [one_line_error(r)] and r.stderr.count("cannot reach") == 1
    r = deepwatch("grafana", "provision", "--url", "http://127.0.0.1:1", "--token", "t", env=narrow)
    assert r.stderr.splitlines() == ["error: cannot reach Grafana at http://127.0.0.1:1: Connection refused"]
    r = deepwatch("grafana", "provision", "--url", "grafana.example", "--token", "t")
    assert r.returncode == 2 and "not an http(s) URL" in r.stderr  # was requests' "Invalid URL '://None/...'"


def test_desk_user_on_a_broken_users_file_or_a_settings_like_variable(tmp_path):
    users = tmp_path / "desk-users.json"
    users.write_text("{broken")
    r = deepwatch("desk-user", "ana", "--data-dir", str(tmp_path), "--password-env", "DW_TEST_PW",
                  env={"DW_TEST_PW": "long enough password"})
    assert "users file" in one_line_error(r) and "is not valid" in r.stderr  # was a JSONDecodeError traceback
    assert users.read_text() == "{broken"  # left as it was
    # A DEEPWATCH_* name not shaped like a secret would be refused as an unknown setting
    r = deepwatch("desk-user", "ana", "--data-dir", str(tmp_path), "--password-env", "DEEPWATCH_DESK_PW",
                  env={"DEEPWATCH_DESK_PW": "long enough password"})
    assert r.returncode == 2 and "DEEPWATCH_DESK_PASSWORD" in r.stderr and "unknown setting" not in r.stderr


def test_a_port_in_use_is_one_line_naming_the_option(tmp_path):
    # uvicorn logged a JSON bind error after its start-up and exited 3;
    # the metrics server raised "[Errno 98] Address already in use".
    import socket

    from streams import metrics
    from streams.net_errors import PortInUse

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = deepwatch("serve", "--port", str(port), "--data-dir", str(tmp_path))
        assert r.stderr.splitlines() == [f"error: port {port} on 127.0.0.1 is in use by another process; pick another --port"]
        r = deepwatch("serve-ingest", "--port", str(port), "--broker", "kafka://127.0.0.1:1",
                      env={"DEEPWATCH_INGEST_TOKENS": "tip:0123456789abcdef0123"})
        assert f"port {port} on 127.0.0.1 is in use" in one_line_error(r)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as caught:
            metrics.serve(port)
        assert str(caught.value).startswith(f"metrics port {port} is in use") and "Errno" not in str(caught.value)


def test_connector_option_mistakes_are_one_line():
    # both were ValueError tracebacks from inside the connector builders
    r = deepwatch("connect", "bluesky", "--jetstream-url", "ftp://x", "--dry-run", "--duration", "1")
    assert "ws:// or wss://" in one_line_error(r)
    r = deepwatch("connect", "mastodon", "--instance", "https://m.example", "--hashtag", "#", "--dry-run",
                  "--duration", "1")
    assert "--hashtag needs a tag" in one_line_error(r)


@pytest.mark.parametrize("args, says", [
    (["replay", "--bogus", "x"], "No such option: --bogus"),
    (["replay"], "Missing argument 'FEED'"),
    (["settings", "--config", "."], "is a directory"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_mistakes_are_one_error_line_naming_the_help(tmp_path, args, says):
    # Typer drew these as a five-line box (Usage:, Try ..., a framed message).
    r = deepwatch(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    assert "--help'" in lines[0]


def test_grafana_provision_against_something_that_is_not_grafana(tmp_path):
    # A port that answered every path 404 printed "Client Error 404: " and
    # stopped there; one that never answered was "refused the request: ...
    # Read timed out".
    import http.server
    import socket
    import threading

    class NotGrafana(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotGrafana)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        r = deepwatch("grafana", "provision", "--url", f"http://127.0.0.1:{server.server_port}", "--token", "t")
        line = one_line_error(r)
        assert r.returncode == 2 and "404" in line and "is the URL Grafana's own address" in line, r.stderr
        r = deepwatch("grafana", "provision", "--url", f"http://127.0.0.1:{silent.getsockname()[1]}", "--token", "t",
                      "--timeout", "0.5")
        line = one_line_error(r)
        assert r.returncode == 2 and "did not answer in time" in line and "--timeout" in line, r.stderr
    finally:
        server.shutdown()
        silent.close()


def test_a_replay_whose_every_event_was_dead_lettered_says_the_feed_may_be_wrong(tmp_path):
    # `deepwatch replay /etc/passwd`: "done", 25 of 25 lines dead-lettered, exit 0 and not a word more
    feed = tmp_path / "passwd"
    feed.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    r = deepwatch("replay", str(feed), "--data-dir", str(tmp_path / "d"), "--workers", "1", "--no-wait-models",
                  timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 dead letters" in r.stderr
    assert "warning: every event of this run was dead-lettered: is FEED a deepwatch event feed" in " ".join(
        r.stderr.split())
    r = deepwatch("replay", str(feed), "--data-dir", str(tmp_path / "e"), "--workers", "1", "--no-wait-models",
                  "--format", "json", timeout=300)
    doc = json.loads(r.stdout)
    assert doc["events"] == 2 and "every event of this run was dead-lettered" in r.stderr
    assert sum(doc["run_dead_letters"].values()) == 2 and all(k.startswith("validate:") for k in doc["run_dead_letters"])
    # a valid feed whose pictures are not where its paths say: the pictures are named, not the feed
    # ... into a data dir whose earlier run dead-lettered other lines: this run's reasons decide
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(json.dumps({"event_id": f"e{i}", "platform": "x", "account_id": "a",
                                         "posted_at": "2026-12-01T10:00:00Z", "image": {"path": f"images/p{i}.jpg"}})
                             + "\n" for i in range(2)))
    r = deepwatch("replay", str(posts), "--data-dir", str(tmp_path / "d"), "--workers", "1", "--no-wait-models",
                  timeout=300)
    said = " ".join(r.stderr.split())
    assert r.returncode == 0 and "fetch:not_found=2" in said, r.stderr[-2000:]
    assert "no picture of this run could be read" in said and "is FEED" not in said
