"""A new operator's mistakes, each held to one `error:` line and a non-zero
exit (never a traceback), and the output options held to one contract:
prune with a period of centuries, a desk user name with a space, a garbage
file given as Jetstream's zstd dictionary, pydantic's "Value error," in a
usage line, `--json` missing from search/bank list/similar, a terminal
whose encoding cannot hold "—"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.findings_fixture import fill

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout, cwd=cwd or ROOT, stdin=subprocess.DEVNULL,
                          env={**base, "PYTHONPATH": str(ROOT), "COLUMNS": "100", **(env or {})})


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    from streams.store import open_store

    s = open_store(tmp_path)
    fill(s)
    s.close()
    (tmp_path / "blobs").mkdir()
    return tmp_path


def test_prune_a_period_of_centuries_is_one_line_not_a_traceback(data_dir):
    # the cutoff was computed before any check: "ValueError: year -711 is out of range"
    line = _one_error_line(_cli("prune", "--older-than", "999999d", "--dry-run", "-d", str(data_dir)))
    assert "36500d" in line
    ok = _cli("prune", "--older-than", "36500d", "--dry-run", "--format", "json", "-d", str(data_dir))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["deleted"] == 0


@pytest.mark.parametrize("name", ["bad name", "a" * 65, "x\x1b[31m"])
def test_desk_user_bad_name_says_what_a_name_is_without_pydantic_words(tmp_path, name):
    line = _one_error_line(_cli("desk-user", name, "-d", str(tmp_path)))
    assert "String should" not in line and "pattern" not in line and "^[" not in line, line
    assert "letters, digits" in line
    assert "\x1b" not in line  # the name is shown escaped, not sent to the terminal


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 20])
def test_connect_bluesky_refuses_a_file_that_is_no_zstd_dictionary(tmp_path, content):
    bad = tmp_path / "dict"
    bad.write_bytes(content)
    r = _cli("connect", "bluesky", "--dry-run", "--duration", "1", "--zstd-dictionary", str(bad),
             "--jetstream-url", "ws://127.0.0.1:1/subscribe", "-d", str(tmp_path / "d"))
    line = _one_error_line(r)
    assert "--zstd-dictionary" in line and "zstd" in line


def test_connect_bluesky_takes_a_trained_zstd_dictionary(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    good = tmp_path / "dict"
    samples = [b'{"kind":"commit","did":"did:plc:%d","time_us":%d}' % (i, i * 7) for i in range(400)]
    good.write_bytes(zstandard.train_dictionary(1024, samples).as_bytes())
    from tests.connector_servers import JetstreamServer

    with JetstreamServer([]) as server:  # a connector that never connects ends 1: this one connects
        r = _cli("connect", "bluesky", "--dry-run", "--duration", "0.5", "--zstd-dictionary", str(good),
                 "--jetstream-url", server.url, "-d", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert "error:" not in r.stderr


@pytest.mark.parametrize("args", [("schema", "foo"), ("detect", "x.jpg", "--format", "xml")])
def test_a_bad_choice_has_no_pydantic_prefix(args):
    line = _one_error_line(_cli(*args))
    assert "Value error" not in line
    assert "is not one of" in line


def test_a_settings_validator_message_has_no_pydantic_prefix(data_dir):
    r = _cli("clusters", "-d", str(data_dir), env={"DEEPWATCH_FINDINGS__URL": "foo"})
    line = _one_error_line(r)
    assert "Value error" not in line and "findings.url" in line


def test_search_takes_json_like_the_other_queries(data_dir):
    r = _cli("search", "harbour", "-d", str(data_dir), "--json")
    assert r.returncode == 0, r.stderr
    assert [c["id"] for c in json.loads(r.stdout)] == ["c-fire"]
    empty = _cli("search", "zzzz", "-d", str(data_dir), "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []


def test_bank_list_and_similar_take_json(tmp_path):
    from PIL import Image

    picture = tmp_path / "p.png"
    Image.new("RGB", (120, 90), (200, 10, 10)).save(picture)
    added = _cli("bank", "add", "known", str(picture), "--verdict", "fake", "-d", str(tmp_path / "d"))
    assert added.returncode == 0, added.stderr
    banks = _cli("bank", "list", "-d", str(tmp_path / "d"), "--json")
    assert banks.returncode == 0, banks.stderr
    assert [b["name"] for b in json.loads(banks.stdout)] == ["known"]
    near = _cli("similar", str(picture), "-d", str(tmp_path / "d"), "--json")
    assert near.returncode == 0, near.stderr
    assert [r["bank"] for r in json.loads(near.stdout)] == ["known"]


def test_similar_table_with_nothing_near_says_so(data_dir, tmp_path):
    from PIL import Image

    picture = tmp_path / "other.png"
    Image.new("RGB", (300, 200), (1, 2, 3)).save(picture)
    r = _cli("similar", str(picture), "-d", str(data_dir), "--format", "table")
    assert r.returncode == 0, r.stderr
    assert "nothing near this picture" in r.stderr


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_terminal_that_cannot_hold_a_dash_gets_an_escape_not_a_traceback(data_dir, encoding):
    from streams.store import open_store

    from tests.findings_fixture import dead_letters

    s = open_store(data_dir)
    s.add_dead_letter(dead_letters()[0].model_copy(update={"event_id": None, "detail": "naïve → ✓"}))
    s.close()
    r = _cli("dead-letters", "-d", str(data_dir), env={"PYTHONIOENCODING": encoding})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "\\u2014" in r.stdout or "\\u2192" in r.stdout  # the empty event cell or the arrow, escaped


def test_ingest_reads_a_pipe_named_dash(tmp_path):
    # `cat feed | deepwatch ingest - --broker ...` said "file '-' does not exist"
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.settings import Settings
    from streams.topics import topic_specs
    from tests.connector_servers import read_topic

    settings = Settings(topic_prefix="auditdash")
    event = {"schema_version": 1, "event_id": "dash-1", "platform": "x", "account_id": "a",
             "posted_at": "2026-11-30T10:00:00Z", "image": {"url": "https://x.org/1.jpg"}}
    with EmbeddedBroker(tmp_path / "broker") as b:
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
        r = subprocess.run([sys.executable, "-m", "streams.cli", "ingest", "-", "--broker", b.url],
                           input=json.dumps(event) + "\n", capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**base, "PYTHONPATH": str(ROOT), "DEEPWATCH_TOPIC_PREFIX": "auditdash"})
        assert r.returncode == 0, r.stderr
        assert "produced 1 events" in r.stderr
        got = read_topic(b.bootstrap, settings.topic("events"), 1, timeout_s=60)
    assert [json.loads(v)["event_id"] for v in got] == ["dash-1"]


def test_ingest_a_missing_feed_is_still_one_line():
    line = _one_error_line(_cli("ingest", "no-such-feed.jsonl", "--broker", "kafka://127.0.0.1:1"))
    assert "no-such-feed.jsonl" in line and "does not exist" in line


@pytest.mark.parametrize("broker", ["foo", "kafka://127.0.0.1:1"])
def test_replay_with_a_bad_broker_says_so_before_starting_anything(tmp_path, broker):
    # "starting 2 worker(s); logs in ..." came first, then the error
    feed = tmp_path / "feed.jsonl"
    feed.write_text(json.dumps({"schema_version": 1, "event_id": "e", "platform": "x", "account_id": "a",
                                "posted_at": "2026-11-30T10:00:00Z", "image": {"url": "https://x.org/1.jpg"}}) + "\n")
    line = _one_error_line(_cli("replay", str(feed), "-d", str(tmp_path / "d"), "--broker", broker))
    assert "127.0.0.1:1" in line or "'foo'" in line
    assert not (tmp_path / "d" / "logs").exists() or not any((tmp_path / "d" / "logs").iterdir())


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc: a directory nobody can write in, even root")
@pytest.mark.parametrize("args", [
    ("broker", "--port", "0", "-d", "/proc"),
    ("models", "fetch", "x", "--url", "weights.safetensors", "--model-dir", "/proc"),
    ("models", "fetch", "x", "--url", "weights.safetensors", "-d", "/proc"),
])
def test_a_directory_that_cannot_be_written_is_one_line_naming_it(args):
    # both ended on a bare "[Errno 13] Permission denied: '.../logs'" ('.../models')
    line = _one_error_line(_cli(*args))
    assert "/proc" in line and "writable directory" in line and "Errno" not in line


def test_transient_bars_leave_no_blank_line_off_a_terminal(data_dir, tmp_path):
    # prune, similar and bank add each left a lone "\n" on stderr (a transient bar's end)
    from PIL import Image

    picture = tmp_path / "p.png"
    Image.new("RGB", (120, 90), (200, 10, 10)).save(picture)
    for args in (("prune", "--older-than", "1d", "-d", str(data_dir)),
                 ("similar", str(picture), "-d", str(data_dir)),
                 ("bank", "add", "known", str(picture), "--verdict", "fake", "-d", str(tmp_path / "b"))):
        r = _cli(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert "\n\n" not in "\n" + r.stderr, (args, r.stderr)


def test_version():
    r = _cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("deepwatch ")
    assert r.stdout.split()[1][0].isdigit() or "unknown" in r.stdout, r.stdout


def test_the_findings_file_named_as_data_dir_points_at_its_directory(data_dir):
    line = _one_error_line(_cli("clusters", "-d", str(data_dir / "findings.sqlite")))
    assert f"--data-dir {data_dir}" in line


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
def test_detect_json_is_strict_unicode_for_a_file_name_that_is_not_utf8(tmp_path):
    # json.dumps wrote the name's undecodable byte as a lone "\udcff", which strict parsers refuse
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    name = os.path.join(os.fsencode(folder), b"bad\xff name.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(os.fsdecode(name), format="PNG")
    Image.new("RGB", (64, 64), (30, 20, 10)).save(folder / "ünï 🔥.png")
    r = _cli("detect", str(folder), "--no-models")
    assert r.returncode == 0, r.stderr
    assert "\\udcff" not in r.stdout
    paths = sorted(x["path"] for x in json.loads(r.stdout))
    for p in paths:
        p.encode("utf-8")  # strict: no lone surrogates
    assert paths[0].endswith("bad\\xff name.png") and paths[1].endswith("ünï 🔥.png"), paths


def test_search_until_the_last_microsecond_of_year_9999_matches_everything(data_dir):
    # SQLite's julianday rounded it past year 9999: the search matched nothing
    r = _cli("search", "-d", str(data_dir), "--until", "9999-12-31T23:59:59.999999+00:00", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(c["id"] for c in json.loads(r.stdout)) == ["c-fire", "c-flood", "c-pope"]


def test_redeliver_a_mistyped_alert_id_is_an_error_not_zero_requeued(data_dir):
    # "--alert nosuch" said "0 rejected deliveries ... queued again", exit 0
    from streams.findings import DeliveryState
    from streams.store import open_store
    from streams.webhooks import target_key

    url = "https://hooks.example/x"
    key = target_key(url)
    s = open_store(data_dir)
    s.mark_delivered("c-fire:1", key, DeliveryState.REJECTED, "401 Unauthorized")
    s.close()
    other = "https://other-hooks.example/y"
    env = {"DEEPWATCH_ALERTS__WEBHOOKS": json.dumps([{"url": url}, {"url": other}]),
           "DEEPWATCH_WEBHOOK_SECRET": "k" * 32}
    line = _one_error_line(_cli("redeliver", url, "--alert", "nosuch", "-d", str(data_dir), env=env))
    assert "--alert nosuch" in line and "deepwatch alerts" in line
    # an alert this target never had a delivery of: the same "0 queued again", exit 0, before
    line = _one_error_line(_cli("redeliver", other, "--alert", "c-fire:1", "-d", str(data_dir), env=env))
    assert "--alert c-fire:1" in line and "to https://other-hooks.example#" in line
    ok = _cli("redeliver", url, "--alert", "c-fire:1", "-d", str(data_dir), "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["requeued"] == 1


def test_train_on_empty_folders_names_them_instead_of_asking_for_folders(tmp_path):
    # "no images: give --real/--fake folders or --manifest" when both were given
    (tmp_path / "real").mkdir()
    (tmp_path / "fake").mkdir()
    line = _one_error_line(_cli("train", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                                "-d", str(tmp_path / "d")))
    assert f"--real {tmp_path / 'real'}" in line and f"--fake {tmp_path / 'fake'}" in line
    assert "give --real/--fake folders" not in line


def test_search_a_query_over_the_limit_is_one_line(data_dir):
    # a pydantic ValidationError traceback (ClusterQuery.text has max_length=1000)
    line = _one_error_line(_cli("search", "x" * 5000, "-d", str(data_dir), "--json"))
    assert "QUERY" in line and "1000" in line
    ok = _cli("search", "x" * 1000, "-d", str(data_dir), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr


def test_a_query_starting_with_a_dash_says_to_put_it_after_double_dash(data_dir):
    # `deepwatch search -harbour` said only "No such option: -a"
    line = _one_error_line(_cli("search", "-d", str(data_dir), "-harbour"))
    assert "after --" in line
    ok = _cli("search", "-d", str(data_dir), "--json", "--", "-harbour")
    assert ok.returncode == 0 and [c["id"] for c in json.loads(ok.stdout)] == ["c-fire"], ok.stderr
    # a command without arguments keeps the plain line
    assert "after --" not in _one_error_line(_cli("clusters", "-x"))


def test_mastodon_hashtag_with_a_space_is_refused_before_anything_connects(tmp_path):
    # "bad tag!" was streamed (nothing, for ever) without a word; a broker was reached first
    line = _one_error_line(_cli("connect", "mastodon", "--instance", "https://127.0.0.1:1", "--hashtag", "bad tag!",
                                "--broker", "kafka://127.0.0.1:1", "-d", str(tmp_path)))
    assert "--hashtag 'bad tag!'" in line and "letters, digits and _" in line
    from streams.cli.connect import MASTODON_TAG

    # the separators Mastodon allows inside a tag are not refused: Catalan, Japanese, Persian tags
    for tag in ("col·lecció", "ニュース・速報", "می\u200cخواهم", "breaking_news", "2026"):
        assert MASTODON_TAG.fullmatch(tag), tag
    for tag in ("bad tag!", "·lead", "trail·", "a-b"):
        assert not MASTODON_TAG.fullmatch(tag), tag


def test_alerts_table_keeps_time_and_cluster_id_readable_at_80_columns(tmp_path):
    # the boxed table spent 17 columns on rules: "2026-11-20T1" / "0:04:15Z" and
    # "edfc825e5d" / "1eef8f" were each cut in two
    from datetime import datetime, timezone

    from streams.records import Alert, Velocity
    from streams.store import open_store

    s = open_store(tmp_path)
    s.add_alert(Alert(alert_id="edfc825e5d1eef8f:1", cluster_id="edfc825e5d1eef8f",
                      rule="fake_score>=0.7 and sightings_5m>=10", level=1, fake_score=1.0, verdict="likely-ai",
                      velocity=Velocity(sightings_5m=15), sightings=15, accounts=15, evidence=[],
                      at=datetime(2026, 11, 20, 10, 4, 15, tzinfo=timezone.utc)))
    s.close()
    r = _cli("alerts", "-d", str(tmp_path), env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    assert "edfc825e5d1eef8f" in r.stdout and "10:04:15" in r.stdout and "2026-11-20" in r.stdout
    assert "webhook" in r.stdout  # no header cropped off the edge
