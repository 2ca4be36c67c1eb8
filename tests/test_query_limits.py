"""Analyst reads are bounded: ``alerts(limit=N)`` / ``dead_letters(limit=N)``
give the newest N (still oldest first) with the bound pushed into the query
(SQL LIMIT; ES size + search_after), and ``deepwatch alerts`` /
``deepwatch dead-letters`` show the newest 100 by default, saying on stderr
when there were more; the JSON stays the same array of the same objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from streams.findings import DeliveryState
from streams.records import DeadLetter, SourceRef
from tests.findings_fixture import T0, TOPIC, alerts as fixture_alerts


def _alerts(n: int):
    a = fixture_alerts()[0]
    # created out of order: the store orders them, not the writer
    order = list(range(n))[::2] + list(range(n))[1::2]
    return [a.model_copy(update={"alert_id": f"c-fire:{i + 1}", "level": i + 1,
                                 "created_at": T0 + timedelta(minutes=i)}) for i in order]


def _dead_letters(n: int):
    return [DeadLetter(event_id=f"bad-{i}", stage="fetch", reason="fetch_blocked", detail=f"private address {i}",
                       source=SourceRef(topic=TOPIC, partition=0, offset=100 + i), at=T0 + timedelta(seconds=i))
            for i in range(n)]


def _fill(store, n_alerts: int = 5, n_dead: int = 7):
    for a in _alerts(n_alerts):
        store.add_alert(a)
    store.add_dead_letters(_dead_letters(n_dead))
    getattr(store, "refresh", lambda: None)()
    return store


def _es(fake_es):
    from tests.test_es_store import _store

    return _store(fake_es)


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    if request.param == "sqlite":
        from streams.store import open_store

        s = open_store(tmp_path)
    else:
        s = _es(request.getfixturevalue("fake_es"))
    yield _fill(s)
    s.close()


def test_store_reads_take_the_newest_n_oldest_first_and_count_them_all(store):
    every = store.alerts()
    assert [a.alert_id for a in every] == [f"c-fire:{i}" for i in range(1, 6)] and every.total == 5
    newest = store.alerts(limit=2)
    assert [a.alert_id for a in newest] == ["c-fire:4", "c-fire:5"]
    assert newest.total == 5 and newest.cut and newest == every[-2:]
    assert store.alerts(limit=0) == every and not store.alerts(limit=0).cut  # 0: no bound, as on the CLI
    roomy = store.alerts(limit=50)
    assert roomy == every and roomy.total == 5 and not roomy.cut

    dls = store.dead_letters()
    assert [d.event_id for d in dls] == [f"bad-{i}" for i in range(7)] and dls.total == 7
    last3 = store.dead_letters(limit=3)
    assert [d.event_id for d in last3] == ["bad-4", "bad-5", "bad-6"] and last3.total == 7
    assert store.dead_letters(limit=7) == dls and not store.dead_letters(limit=7).cut
    with pytest.raises(ValueError):
        store.dead_letters(limit=-1)


def test_empty_store_reads_with_a_limit(tmp_path, fake_es):
    from streams.store import open_store

    for s in (open_store(tmp_path), _es(fake_es)):
        assert s.alerts(limit=3) == [] and s.alerts(limit=3).total == 0
        assert s.dead_letters(limit=3) == [] and s.dead_letters() == []
        s.close()


def test_sqlite_limit_is_pushed_into_the_sql(tmp_path):
    from streams.store import open_store

    s = _fill(open_store(tmp_path))
    s.dead_letters(limit=3)  # a cut read runs in a snapshot on a reader connection, kept for the next read
    sql: list[str] = []
    for db in (s._db, *s._idle_readers):
        db.set_trace_callback(sql.append)
    s.dead_letters(limit=3)
    s.alerts(limit=10)
    for db in (s._db, *s._idle_readers):
        db.set_trace_callback(None)
    reads = [q for q in sql if q.lstrip().upper().startswith("SELECT")]
    assert "ORDER BY at DESC, dl_key DESC LIMIT 3" in reads[0]
    assert "COUNT(*)" in reads[1]  # cut: counted
    assert "ORDER BY created_at DESC, alert_id DESC LIMIT 10" in reads[2]
    assert len(reads) == 3  # not cut: no count
    s.close()


def test_es_limit_is_size_and_search_after_never_a_scan(fake_es, monkeypatch):
    import streams.es_requests as es_requests

    s = _fill(_es(fake_es))
    n = len(fake_es.requests)
    got = s.alerts(limit=2)
    [req] = [r for r in fake_es.requests[n:] if r.path.endswith("/_search")]
    assert req.body["size"] == 2 and req.body["track_total_hits"] is True
    assert req.body["sort"] == [{"created_at": "desc"}, {"alert_id": "desc"}]
    assert [a.alert_id for a in got] == ["c-fire:4", "c-fire:5"] and got.total == 5

    monkeypatch.setattr(es_requests, "PAGE", 2)  # a limit over one page pages on with search_after
    n = len(fake_es.requests)
    got = s.dead_letters(limit=5)
    reqs = [r.body for r in fake_es.requests[n:] if r.path.endswith("/_search")]
    assert [b["size"] for b in reqs] == [2, 2, 1]
    assert "search_after" not in reqs[0] and all("search_after" in b for b in reqs[1:])
    assert [d.event_id for d in got] == [f"bad-{i}" for i in range(2, 7)] and got.total == 7
    s.close()


def test_both_stores_answer_the_same(tmp_path, fake_es):
    from streams.store import open_store

    got = {}
    for name, s in (("sqlite", open_store(tmp_path)), ("es", _es(fake_es))):
        _fill(s)
        got[name] = [([a.as_json() for a in s.alerts(limit=k)], s.alerts(limit=k).total,
                      [d.as_json() for d in s.dead_letters(limit=k)], s.dead_letters(limit=k).total)
                     for k in (None, 1, 3, 9)]
        s.close()
    assert got["es"] == got["sqlite"]


# -- the commands ----------------------------------------------------------------
def deepwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(params=["sqlite", "es"])
def where(request, tmp_path):
    """CLI arguments naming a store filled with 5 alerts and 7 dead letters."""
    if request.param == "sqlite":
        from streams.store import open_store

        s = _fill(open_store(tmp_path))
        s.mark_delivered("c-fire:5", "https://desk.example/hook", DeliveryState.DELIVERED)
        s.close()
        return ["--data-dir", str(tmp_path)]
    fake = request.getfixturevalue("fake_es")
    s = _fill(_es(fake))
    s.mark_delivered("c-fire:5", "https://desk.example/hook", DeliveryState.DELIVERED)
    s.refresh()
    s.close()
    return ["--data-dir", str(tmp_path), "--store", fake.url.replace("http://", "es://")]


def test_commands_show_the_newest_n_and_say_so_on_stderr(where):
    r = deepwatch("dead-letters", *where, "--limit", "3")
    assert r.returncode == 0, r.stderr
    assert "bad-6" in r.stdout and "bad-4" in r.stdout and "bad-3" not in r.stdout
    assert "showing the newest 3 of 7 dead letters; --limit N for more, --limit 0 for all" in r.stderr
    assert r.stdout.index("bad-4") < r.stdout.index("bad-6")  # oldest first, as before

    r = deepwatch("dead-letters", *where, "--json", "--limit", "3")
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)  # still one JSON array on stdout
    assert [d["event_id"] for d in docs] == ["bad-4", "bad-5", "bad-6"]
    # the original fields, plus the record's version (an addition)
    assert set(docs[0]) == {"event_id", "stage", "reason", "detail", "source", "payload_excerpt", "at", "schema_version"}
    assert "showing the newest 3 of 7" in r.stderr

    r = deepwatch("dead-letters", *where, "--limit", "0", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 7 and "showing" not in r.stderr

    r = deepwatch("alerts", *where, "--format", "json", "--limit", "2")
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)
    assert [d["alert_id"] for d in docs] == ["c-fire:4", "c-fire:5"]
    assert docs[1]["deliveries"][0]["status"] == "delivered" and docs[0]["deliveries"] == []
    assert "showing the newest 2 of 5 alerts" in r.stderr

    r = deepwatch("alerts", *where)  # default 100: everything here, no note
    assert r.returncode == 0 and "c-fire" in r.stdout and "showing" not in r.stderr


def test_default_limit_is_100_in_a_table_and_all_in_json(tmp_path):
    from streams.store import open_store

    s = open_store(tmp_path)
    s.add_dead_letters(_dead_letters(130))
    s.close()
    r = deepwatch("dead-letters", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "bad-129" in r.stdout and "bad-30" in r.stdout and "bad-29" not in r.stdout
    assert "showing the newest 100 of 130 dead letters" in " ".join(r.stderr.split())
    r = deepwatch("dead-letters", "--data-dir", str(tmp_path), "--json")  # what tools read stays complete
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)) == 130 and "showing" not in r.stderr
    r = deepwatch("dead-letters", "--data-dir", str(tmp_path), "--limit", "-1")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_sqlite_reads_the_newest_n_through_an_index_not_a_sort_of_the_table(tmp_path):
    from streams.store import open_store

    s = _fill(open_store(tmp_path))
    for table, order in (("dead_letters", "at DESC, dl_key DESC"), ("alerts", "created_at DESC, alert_id DESC")):
        plan = " ".join(str(row[-1]) for row in s._db.execute(
            f"EXPLAIN QUERY PLAN SELECT * FROM {table} ORDER BY {order} LIMIT 3"))
        assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, (table, plan)
    s.close()


def test_delivery_statuses_of_a_page_of_alerts_only(store):
    # `deepwatch alerts --limit N` read every delivery record of the store to label N alerts.
    for i in range(1, 6):
        store.mark_delivered(f"c-fire:{i}", "https://hooks.example/a", DeliveryState.DELIVERED)
    store.mark_delivered("c-fire:5", "https://hooks.example/b", DeliveryState.FAILED, "HTTP 503")
    getattr(store, "refresh", lambda: None)()
    every = store.delivery_status()
    page = store.delivery_status(["c-fire:4", "c-fire:5", "c-none:1"])
    assert page == {k: every[k] for k in ("c-fire:4", "c-fire:5")}
    assert len(page["c-fire:5"]) == 2 and store.delivery_status([]) == {}
