"""A verdict keeps every member sha256 of its cluster in the audit trail
(10,000 members: 670 KB a verdict). The cluster's page lists the first
``LIST_MEMBERS`` of them with ``members_total``; SQLite cuts them, so a
history read no longer carries (and parses) every member of every verdict,
and the answer is the one the desk gave when Python cut them."""

from __future__ import annotations

import json
import sqlite3

from streams.desk.deskdb import DeskDB
from streams.desk.source import LIST_MEMBERS, state_page
from streams.desk.verdicts import cluster_state

VIRAL = 10_000


def _doc(n: int, **extra) -> dict:
    """A cluster document with ``n`` members, as ``cluster_state`` reads one."""
    return {"fake_score": 0.91, "verdict": "likely-ai", "sightings": 3 * n, "accounts": n, "platforms": ["x", "bluesky"],
            "first_seen": "2026-11-20T10:00:00+00:00", "last_seen": "2026-11-20T11:00:00.123456+05:00",
            "velocity": {"sightings_5m": 7, "sightings_1h": 0.30000000000000004}, "alert_level": 1,
            "suppressed": None, "revision": 12, "desk": {"verdict": "needs-review", "note": "é \u2028 \"q\""},
            "evidence": [{"detector": "metadata", "score": 1e-05, "detail": "C2PA: made by a generator"}],
            "members": [{"sha256": f"{i:064x}"} for i in range(n)], **extra}


class _Recording:
    """The desk database's connection, keeping what each statement returned."""

    def __init__(self, db: sqlite3.Connection):
        self.db, self.rows = db, []

    def execute(self, *args):
        rows = self.db.execute(*args).fetchall()
        self.rows.extend(rows)
        return _Rows(rows)


class _Rows(list):
    def fetchall(self):
        return list(self)


def _answer(records) -> str:
    """The cluster page's ``verdict_history``, as the API writes it (key order included)."""
    return json.dumps([state_page(v.model_dump(mode="json")) for v in records])


def test_history_of_a_viral_clusters_verdicts_reads_a_page_of_members(tmp_path):
    desk = DeskDB(tmp_path / "desk.sqlite")
    desk.add_verdict("c-viral", "needs-review", "checking", "ed", "editor", cluster_state(_doc(VIRAL)))
    desk.add_verdict("c-viral", "fake", "generated", "ed", "editor", cluster_state(_doc(VIRAL + 5)))
    desk.add_verdict("c-viral", "authentic", "no members kept", "ed", "editor", cluster_state(_doc(0)))
    desk.add_verdict("c-viral", "fake", "a few", "ed", "editor", cluster_state(_doc(3)))
    desk.add_verdict("c-other", "fake", "not this cluster", "ed", "editor", cluster_state(_doc(50)))
    desk.record_effects(2, {"alerts": ["c-viral:desk-fake:2"], "banked": VIRAL + 5})
    stored = sum(len(s) for s, in desk._db.execute("SELECT cluster_state FROM verdicts WHERE cluster_id='c-viral'"))
    assert stored > 2 * 600_000  # what every read of the page carried before

    whole = desk.history(["c-viral"])  # the audit trail as kept: what the page was made from before
    assert [len(v.cluster_state["members"]) for v in whole] == [VIRAL, VIRAL + 5, 0, 3]
    desk._db = recording = _Recording(desk._db)
    paged = desk.history(["c-viral"], members=LIST_MEMBERS)

    assert _answer(paged) == _answer(whole)
    states = [json.loads(_answer(paged))[i]["cluster_state"] for i in range(4)]
    assert [(len(s["members"]), s["members_total"]) for s in states] == [
        (LIST_MEMBERS, VIRAL), (LIST_MEMBERS, VIRAL + 5), (0, 0), (3, 3)]
    assert states[0]["members"] == [f"{i:064x}" for i in range(LIST_MEMBERS)]
    # what SQLite handed Python: a page of members a verdict, not the 10,000
    returned = sum(len(c) for row in recording.rows for c in row if isinstance(c, str))
    assert returned < 20_000, returned
    assert max(len(json.loads(row[7])["members"]) for row in recording.rows) == LIST_MEMBERS
    desk._db = recording.db
    desk.close()


def test_a_state_sqlite_cannot_cut_comes_whole_and_is_paged_as_before(tmp_path):
    """Members that are not text come whole (SQLite would write a number its
    own way), and so does a state without members; the page cuts them as it
    did."""
    desk = DeskDB(tmp_path / "desk.sqlite")
    odd = cluster_state(_doc(25))
    odd["members"][1] = 0.30000000000000004
    desk.add_verdict("c1", "fake", "odd member", "ed", "editor", odd)
    desk.add_verdict("c1", "fake", "plain", "ed", "editor", cluster_state(_doc(30)))
    desk.add_verdict("c1", "fake", "no members key", "ed", "editor", {"fake_score": 0.5})
    desk.add_verdict("c1", "fake", "members not a list", "ed", "editor", {"members": "abc", "fake_score": 0.5})
    whole = desk.history(["c1"])
    paged = desk.history(["c1"], members=LIST_MEMBERS)
    assert [len(v.cluster_state.get("members", "")) for v in paged] == [25, LIST_MEMBERS, 0, 3]
    assert _answer(paged) == _answer(whole)
    desk.close()


def test_a_state_that_is_no_json_to_sqlite_does_not_fail_the_read(tmp_path):
    """Python's json writes NaN, which SQLite refuses as malformed JSON: the
    history is read whole then, and paged as before."""
    desk = DeskDB(tmp_path / "desk.sqlite")
    desk.add_verdict("c1", "fake", "nan", "ed", "editor", cluster_state(_doc(30, fake_score=float("nan"))))
    desk.add_verdict("c1", "fake", "plain", "ed", "editor", cluster_state(_doc(30)))
    whole = desk.history(["c1"])
    paged = desk.history(["c1"], members=LIST_MEMBERS)
    assert _answer(paged) == _answer(whole)  # NaN written back as NaN on both sides
    assert [s["cluster_state"]["members_total"] for s in json.loads(_answer(paged))] == [30, 30]
    desk.close()
