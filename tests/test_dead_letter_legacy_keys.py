"""A dead letter without an event id stays one dead letter across the
upgrade to keys carrying the message's digest: older stores keyed it
``sha256:<digest of its excerpt>/<stage>/<reason>``, the current key adds
``/<payload digest[:32]>`` (``streams.findings.dead_letter_identity``), and
a replay of the same feed over an older data dir counted the unparseable
line twice. Both backends (SQLite, Elasticsearch on the loopback fake), and
end to end with `deepwatch replay` over a dir holding a row in the old form."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from streams.records import DeadLetter, SourceRef
from tests.fake_es import FakeElasticsearch

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
LINE = b"{this is not json"
LONG = b"{" + b"x" * 600  # past the 512-byte excerpt
LONG_OTHER = LONG + b"y"  # shares LONG's first 512 bytes


def _legacy_key(raw: bytes, stage: str = "validate", reason: str = "malformed_json") -> str:
    # what older deepwatch wrote (pinned here, not computed by the code under test)
    return f"sha256:{hashlib.sha256(raw[:512]).hexdigest()}/{stage}/{reason}"


def _dead(raw: bytes, offset: int, minute: int) -> DeadLetter:
    dl = DeadLetter.of("validate", "malformed_json", f"not valid JSON at offset {offset}", raw,
                       source=SourceRef(topic="deepwatch.events", partition=0, offset=offset))
    return dl.model_copy(update={"at": T0 + timedelta(minutes=minute)})


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    if request.param == "sqlite":
        from streams.store import SqliteFindingsStore

        s = SqliteFindingsStore(tmp_path / "findings.sqlite")
        yield s
        s.close()
        return
    from streams.es_store import EsFindingsStore
    from streams.settings import FindingsSettings, Settings

    es = FakeElasticsearch().start()
    s = EsFindingsStore.from_url(es.url.replace("http://", "es://"),
                                 settings=Settings(findings=FindingsSettings(retry_initial_s=0.001)))
    s.bulk.sleep = lambda _s: None
    yield s
    s.close()
    es.stop()
    assert not es.crashes, "fake ES hit a gap:\n" + "\n".join(es.crashes)
    assert not es.unhandled, [(r.method, r.path) for r in es.unhandled]


def _store_legacy_row(store, raw: bytes, offset: int) -> None:
    """A row as an older deepwatch stored it: no event id, the old key."""
    key, excerpt = _legacy_key(raw), raw[:512].decode()
    at = T0.isoformat()
    if hasattr(store, "bulk"):
        store.ensure_setup()
        doc = {"schema_version": 1, "dl_key": key, "event_id": None, "stage": "validate", "reason": "malformed_json",
               "detail": "not valid JSON", "source": {"topic": "deepwatch.events", "partition": 0, "offset": offset},
               "payload_excerpt": excerpt, "at": at, "@timestamp": at}
        store.bulk.send([({"create": {"_index": store.names["dead_letters"], "_id": key}}, doc)])
    else:
        with store._tx() as db:
            db.execute("INSERT INTO dead_letters (dl_key, event_id, stage, reason, detail, source, payload_excerpt, "
                       "at) VALUES (?,NULL,'validate','malformed_json','not valid JSON',?,?,?)",
                       (key, json.dumps({"topic": "deepwatch.events", "partition": 0, "offset": offset}), excerpt, at))


def _excerpts(store) -> list[str | None]:
    return sorted(d.payload_excerpt or "" for d in store.dead_letters())


def test_the_same_line_again_replaces_the_row_an_older_store_wrote(store):
    _store_legacy_row(store, LINE, 0)
    assert store.add_dead_letters([_dead(LINE, 5, minute=1)]) == 1
    [dl] = store.dead_letters()
    assert dl.payload_excerpt == LINE.decode() and dl.source.offset == 5
    # and it is the current key's row now: the same failure again changes nothing
    assert store.add_dead_letters([_dead(LINE, 6, minute=2)]) == 0
    assert len(store.dead_letters()) == 1


def test_an_older_copy_leaves_the_old_row_alone(store):
    # a replay of the dead-letter topic brings back a failure older than the stored one
    _store_legacy_row(store, LINE, 0)
    assert store.add_dead_letters([_dead(LINE, 0, minute=-5)]) == 0
    assert len(store.dead_letters()) == 1


def test_another_line_is_another_dead_letter(store):
    _store_legacy_row(store, LINE, 0)
    assert store.add_dead_letters([_dead(b"{also not json", 1, minute=1)]) == 1
    assert _excerpts(store) == ["{also not json", LINE.decode()]


def test_two_lines_the_old_key_told_apart_by_excerpt_only_end_as_two(store):
    # the older store kept two long lines sharing their first 512 bytes as one row; both again are two
    _store_legacy_row(store, LONG, 0)
    assert store.add_dead_letters([_dead(LONG, 5, minute=1), _dead(LONG_OTHER, 6, minute=1)]) == 2
    assert len(store.dead_letters()) == 2


def test_replay_over_a_dir_an_older_deepwatch_wrote_counts_the_line_once(tmp_path):
    feed = tmp_path / "feed.jsonl"
    feed.write_bytes(LINE + b"\n")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPWATCH_")}

    def replay() -> dict:
        r = subprocess.run([sys.executable, "-m", "streams.cli", "replay", str(feed), "--data-dir", str(data),
                            "--workers", "1", "--no-wait-models", "--format", "json", "--timeout", "120"],
                           env=env, capture_output=True, text=True, timeout=200, cwd=Path(__file__).parent.parent)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    assert replay()["dead_letters"] == {"validate:malformed_json": 1}
    # make the dir what an older deepwatch left: the line's row under the old key
    db = sqlite3.connect(data / "findings.sqlite")
    with db:
        assert db.execute("UPDATE dead_letters SET dl_key=?", (_legacy_key(LINE),)).rowcount == 1
    db.close()
    assert replay()["dead_letters"] == {"validate:malformed_json": 1}
