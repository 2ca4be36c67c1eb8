"""What the findings readers share, defined once: the cluster orders
(``streams.cluster_search.SORT_ORDER``: the SQLite and Elasticsearch stores and the
desk give the same order, ties included), the stream's verdicts
(``detectors.fusion.Verdict``), the refusal of credentials in
``findings.url`` when settings load, the packaged pixel model's name, and
the store methods every backend has (called, not probed for)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from typing import get_args

import pytest
from pydantic import ValidationError

from detectors import fusion
from streams import cluster_search, findings
from streams.desk.deskdb import DeskDB, OverlayRow
from streams.desk.source import STREAM_VERDICTS, ClusterQuery, FindingsSource, QueueCursor, _apply_overlay
from streams.cluster_search import SORT_KEYS, SORT_ORDER
from streams.findings import VERDICTS, AlertRecord, ClusterRecord, FindingsStore
from streams.cluster_search import ClusterQuery as StoreQuery
from streams.records import (
    Alert, ClusterSnapshot, Engagement, ImageEvent, ImageRef, Member, Sighting, SourceRef, Velocity,
)
from streams.store import SqliteFindingsStore
from tests.desk_support import close_sources
from tests.test_cli_startup_mistakes import _cli, _one_error_line

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=timezone.utc)

# Clusters built to tie: id -> (fake score, sightings, (5-minute, 1-hour) velocity, minute of the
# last sighting, the offset it was posted with). All were seen within 5 minutes of the newest
# sighting, so the desk's velocity (as of that sighting) is the stream's; all are "inconclusive",
# so the queue's lead (viral likely-AI first) is the same for every one.
TIED = {
    "c-a": (0.5, 3, (2, 5), 10, 0),
    "c-b": (0.5, 5, (2, 5), 10, 0),
    "c-c": (0.9, 3, (2, 5), 9, 0),
    "c-d": (0.9, 3, (2, 7), 8, 0),
    "c-e": (0.5, 5, (2, 5), 10, 0),  # ties with c-b on every value: the id decides
    "c-f": (0.1, 1, (9, 9), 10, 2),  # 12:10+02:00, the instant of c-a's 10:10Z
    "c-g": (0.5, 3, (2, 5), 7, 9),  # 19:07+09:00: later as text than 10:10Z, earlier as an instant
}
# The one true order of each sort (descending on its fields, then the id), worked out by hand.
EXPECTED = {
    # 5-minute, 1-hour, score
    "velocity": ["c-f", "c-d", "c-c", "c-a", "c-b", "c-e", "c-g"],
    # score, then sightings (the id order would put c-a before c-b)
    "score": ["c-c", "c-d", "c-b", "c-e", "c-a", "c-g", "c-f"],
    # sightings, then score (the id order would put c-a before c-c)
    "sightings": ["c-b", "c-e", "c-c", "c-d", "c-a", "c-g", "c-f"],
    # the instant, not the text
    "last_seen": ["c-a", "c-b", "c-e", "c-f", "c-c", "c-d", "c-g"],
}


def _tied_snapshots() -> list[ClusterSnapshot]:
    out = []
    for n, (cid, (score, count, (v5, v1), minute, offset_h)) in enumerate(TIED.items()):
        sha = f"{n + 1:x}" * 64
        member = Member(sha256=sha, phash="0" * 16, pdq="0" * 64, pdq_quality=100, event_id=f"{cid}-e0")
        tz = timezone(timedelta(hours=offset_h))
        last = T0 + timedelta(minutes=minute)
        for i in range(count):
            posted = (last - timedelta(seconds=10 * (count - 1 - i))).astimezone(tz)
            ev = ImageEvent(event_id=f"{cid}-e{i}", platform="x", account_id=f"{cid}-acct{i}", posted_at=posted,
                            text="a picture", image=ImageRef(blob=sha))
            s = Sighting(event=ev, source=SourceRef(topic="deepwatch.events", partition=0, offset=100 * n + i),
                         sha256=sha, width=8, height=8, format="PNG",
                         hashes={"phash": "0" * 16, "pdq": "0" * 64, "pdq_quality": 100})
            out.append(ClusterSnapshot(
                cluster_id=cid, revision=i + 1, fake_score=score, verdict="inconclusive", evidence=[],
                members=[member], sightings=i + 1, accounts=i + 1, platforms=["x"], engagement=Engagement(),
                velocity=Velocity(sightings_5m=v5, sightings_1h=v1), first_seen=posted, last_seen=posted,
                new_sighting=s))
    return out


@pytest.fixture(params=["sqlite", "es"])
def tied(request, tmp_path):
    """The tied clusters in each findings store (a function opening another reader of it)."""
    if request.param == "sqlite":
        writer = SqliteFindingsStore(tmp_path / "findings.sqlite")
        writer.apply_snapshots(_tied_snapshots())
        writer.close()
        yield lambda: SqliteFindingsStore(tmp_path / "findings.sqlite")
        return
    from streams.es_store import EsFindingsStore

    es = request.getfixturevalue("fake_es")
    writer = EsFindingsStore.from_url(es.url)
    writer.apply_snapshots(_tied_snapshots())
    writer.flush()
    writer.close()
    yield lambda: EsFindingsStore.from_url(es.url)


def _desk(store, tmp_path) -> FindingsSource:
    return FindingsSource(store, DeskDB(tmp_path / "desk.sqlite"))


@pytest.mark.parametrize("sort", SORT_KEYS)
def test_the_store_search_and_the_desk_queue_give_one_order(tied, tmp_path, sort):
    store = tied()
    try:
        assert [c.id for c in store.search(StoreQuery(sort=sort))] == EXPECTED[sort]
        # a result cut at its limit keeps the top of the same order
        assert [c.id for c in store.search(StoreQuery(sort=sort, limit=3))] == EXPECTED[sort][:3]
    finally:
        store.close()
    src = _desk(tied(), tmp_path)
    try:
        page, nxt = src.clusters_page(ClusterQuery(sort=sort))
        assert [d["id"] for d in page] == EXPECTED[sort] and nxt is None
        # paged two at a time through the cursor: the same order, no cluster twice or lost at a tie
        seen, cursor = [], None
        while True:
            page, cursor = src.clusters_page(ClusterQuery(sort=sort, limit=2, cursor=cursor))
            seen += [d["id"] for d in page]
            if cursor is None:
                break
        assert seen == EXPECTED[sort]
    finally:
        close_sources(src)


@pytest.mark.parametrize("sort", SORT_KEYS)
def test_the_desks_search_from_its_view_sorts_as_the_store_does(tied, tmp_path, sort):
    # A desk verdict alone is searched in the desk's view, sorted there by the values shown:
    # needs-review changes no score or verdict, so the store's order must come out.
    src = _desk(tied(), tmp_path)
    try:
        src.desk.set_overlay([OverlayRow(cluster_id=cid, verdict="needs-review", verdict_id=i + 1, source_cluster=cid,
                                         detail="check") for i, cid in enumerate(TIED)], clear_source="-")
        src.invalidate()
        got = src.analyst_search_page(StoreQuery(sort=sort), desk_verdict="needs-review").rows
        assert [d["id"] for d in got] == EXPECTED[sort]
    finally:
        close_sources(src)


def test_the_order_is_written_once_and_rendered_for_each_reader():
    from streams.es_store import ES_SORT
    from streams.store import _SQL_SORT

    assert set(SORT_ORDER) == set(SORT_KEYS) == set(get_args(cluster_search.SortKey))
    for sort, fields in SORT_ORDER.items():
        assert fields and all(f in get_args(cluster_search.SortField) for f in fields)
        # Elasticsearch: the same fields, largest first (the stream's count for sightings), then the id
        es_fields = {"sightings": "stream_sightings", "sightings_5m": "velocity.sightings_5m",
                     "sightings_1h": "velocity.sightings_1h"}
        assert ES_SORT[sort] == [{es_fields.get(f, f): "desc"} for f in fields] + [{"cluster_id": "asc"}]
        assert _SQL_SORT[sort].endswith(", cluster_id") and _SQL_SORT[sort].count(" DESC") == len(fields)
        # the desk's cursor carries the sort's values (velocity: after its viral likely-AI lead)
        lead = 1 if sort == "velocity" else 0
        token = QueueCursor(sort=sort, key=(1.0,) * (lead + len(fields)), cluster_id="c").encode()
        assert QueueCursor.decode(token, sort).key == (1.0,) * (lead + len(fields))
    # relevance ranks by the match, then as velocity does
    assert cluster_search.sort_order("relevance") == SORT_ORDER["velocity"]


def test_a_cluster_without_a_last_sighting_sorts_last_everywhere():
    rows = [{"id": "a", "last_seen": None}, {"id": "b", "last_seen": "1969-12-31T00:00:00Z"},
            {"id": "c", "last_seen": "2026-01-01T10:30:00+01:00"}, {"id": "d", "last_seen": "2026-01-01T10:00:00"}]
    assert [r["id"] for r in sorted(rows, key=cluster_search.sort_key("last_seen", dict.get))] == ["d", "c", "b", "a"]


# -- verdicts ---------------------------------------------------------------------------
def test_the_verdicts_are_fusions_own():
    assert VERDICTS == STREAM_VERDICTS == get_args(fusion.Verdict) == ("likely-ai", "inconclusive", "no-evidence")
    for model in (ClusterRecord, AlertRecord, Alert, ClusterSnapshot):
        assert get_args(model.model_fields["verdict"].annotation) == VERDICTS, model


def _alert(**over) -> dict:
    return {"alert_id": "c-1:1", "cluster_id": "c-1", "rule": "viral_fake", "level": 1, "fake_score": 0.9,
            "verdict": "likely-ai", "velocity": {"sightings_5m": 3}, "sightings": 3, "accounts": 2, "evidence": [],
            "at": "2026-11-20T10:00:00+00:00", "created_at": "2026-11-20T10:00:01+00:00", **over}


@pytest.mark.parametrize("model", [Alert, AlertRecord])
def test_an_alert_with_a_verdict_fusion_never_gives_is_refused(model):
    for v in VERDICTS:
        assert model.model_validate(_alert(verdict=v)).verdict == v
    with pytest.raises(ValidationError):
        model.model_validate(_alert(verdict="likely_ai"))


def test_every_verdict_the_desk_writes_is_a_stream_verdict():
    # desk alerts carry the overlaid document's verdict (streams.desk.verdicts); account alerts say
    # likely-ai (streams.desk.accounts); both are ``Alert``s, which refuse any other
    doc = {"id": "c-1", "fake_score": 0.5, "verdict": "inconclusive", "evidence": [], "suppressed": None}
    for desk_verdict in ("fake", "authentic", "needs-review"):
        for stream in VERDICTS:
            row = OverlayRow(cluster_id="c-1", verdict=desk_verdict, verdict_id=1, source_cluster="c-1", detail="x")
            assert _apply_overlay(dict(doc, verdict=stream), row)["verdict"] in VERDICTS


def test_alerts_stored_by_the_first_version_still_load(tmp_path):
    # the first Alert: no first_seen, last_seen, platforms, sample_posts, account_id, merged_from
    store = SqliteFindingsStore(tmp_path / "findings.sqlite")
    try:
        old = {k: v for k, v in _alert().items()}
        old.update(schema_version=1, trigger_event_id="e3", trigger_ingested_at=None)
        store._db.execute("INSERT INTO alerts (alert_id, cluster_id, level, doc, created_at) VALUES (?,?,?,?,?)",
                          ("c-1:1", "c-1", 1, json.dumps(old), old["created_at"]))
        store._db.commit()
        [a] = store.alerts()
        assert a.verdict == "likely-ai" and a.platforms == [] and a.merged_from == []
    finally:
        store.close()
    from streams.es_docs import alert_from_doc

    assert alert_from_doc({**_alert(), "@timestamp": "2026-11-20T10:00:00Z", "evidence_summary": ""}).verdict == "likely-ai"


# -- credentials in findings.url -------------------------------------------------------------
CREDENTIALS = "put Elasticsearch credentials in DEEPWATCH_ES_API_KEY or DEEPWATCH_ES_USERNAME/DEEPWATCH_ES_PASSWORD"


@pytest.mark.parametrize("url", ["https://elastic:hunter2@es.internal:9200", "es://elastic:hunter2@es.internal",
                                 "https://hunter2@es.internal:9200"])
def test_credentials_in_the_findings_url_are_refused_when_settings_load(tmp_path, url):
    # loaded with the settings before, and refused only by a command that opened the store
    line = _one_error_line(_cli("settings", "--format", "json", env={"DEEPWATCH_FINDINGS__URL": url}))
    assert "findings.url" in line and CREDENTIALS in line and "hunter2" not in line, line
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[findings]\nurl = "{url}"\n')
    line = _one_error_line(_cli("settings", "--format", "json", "--config", str(cfg)))
    assert "findings.url" in line and CREDENTIALS in line and "hunter2" not in line, line


def test_credentials_in_the_url_are_refused_before_a_command_runs(tmp_path):
    env = {"DEEPWATCH_FINDINGS__URL": "https://elastic:hunter2@127.0.0.1:9"}
    line = _one_error_line(_cli("clusters", "--data-dir", str(tmp_path), env=env))
    assert "findings.url" in line and CREDENTIALS in line and "hunter2" not in line, line
    line = _one_error_line(_cli("search", "--data-dir", str(tmp_path), "--store", "es://elastic:hunter2@127.0.0.1:9"))
    assert "--store" in line and CREDENTIALS in line and "hunter2" not in line, line
    assert not (tmp_path / "findings.sqlite").exists()


def test_credentials_anywhere_in_the_url_are_refused_with_the_clients_line():
    from streams.es_client import EsConfig, EsError

    with pytest.raises(EsError) as e:
        EsConfig.from_url("https://elastic:hunter2@es.internal:9200", env={})
    assert str(e.value) == findings.CREDENTIALS_IN_URL
    # a "/", "?" or "#" in the secret ends the host part early: still refused ("#" passed, "?" said "port")
    for url in ("https://elastic:hunter2@es.internal:9200", "es://token@es.internal",
                "https://elastic:hun/ter2@es.internal:9200", "es://sekret#x@es.internal",
                "https://elastic:hun?ter2@es.internal:9200"):
        with pytest.raises(ValueError) as e:
            findings.check_store_url(url)
        assert str(e.value) == findings.CREDENTIALS_IN_URL
    assert findings.check_store_url("https://es.internal:9200/prefix") == "https://es.internal:9200/prefix"


# -- the packaged pixel model's name ---------------------------------------------------------
def test_the_default_pixel_model_is_named_once():
    from detectors.model_names import DEFAULT_PIXEL_MODEL
    from detectors.models import pixel_detector, pixel_probe, pixel_train
    from streams.settings import DetectSettings

    assert DetectSettings().models == [DEFAULT_PIXEL_MODEL]
    assert pixel_detector.DEFAULT_PIXEL_MODEL == DEFAULT_PIXEL_MODEL and list(pixel_detector.BUILTIN) == [DEFAULT_PIXEL_MODEL]
    assert pixel_detector.PixelProbeDetector.name == f"model:{DEFAULT_PIXEL_MODEL}"
    assert pixel_probe.HeadCard().name == DEFAULT_PIXEL_MODEL
    assert inspect.signature(pixel_train.train_pixel_probe).parameters["name"].default == DEFAULT_PIXEL_MODEL
    assert inspect.signature(pixel_detector.load_pixel_detector).parameters["name"].default == DEFAULT_PIXEL_MODEL


def test_settings_name_the_default_model_without_importing_the_models():
    code = "import sys, streams.settings; print(sorted(m for m in sys.modules if m.startswith(('detectors.models', 'torch'))))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)


# -- the store interface -----------------------------------------------------------------------
CALLED = ("changes_since", "clusters_by_id", "iter_members", "has_member", "verdict_cluster_ids", "recent_clusters")


def test_what_the_desk_reads_is_the_interface_and_both_backends_have_it():
    from streams.es_store import EsFindingsStore

    for name in CALLED:
        assert callable(getattr(FindingsStore, name, None)), name
        assert callable(getattr(SqliteFindingsStore, name, None)) and callable(getattr(EsFindingsStore, name, None)), name
    source = inspect.getsource(FindingsSource)
    for name in CALLED:
        assert f'"{name}"' not in source, f"FindingsSource probes for {name}: call it"


def test_a_store_with_only_the_interface_serves_the_desk(tied, tmp_path):
    """No SQLite extras (data_version, the member index's reads): the desk
    reads the view, its changes and the members through the interface."""

    class Only:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name not in dir(FindingsStore):
                raise AttributeError(name)
            return getattr(self._inner, name)

    inner = tied()
    src = _desk(Only(inner), tmp_path)
    try:
        assert [d["id"] for d in src.clusters_page(ClusterQuery(sort="score"))[0]] == EXPECTED["score"]
        assert {m.sha256 for m in src.iter_members()} == {m.sha256 for m in inner.iter_members()}
        assert src.may_show(next(iter(src.iter_members())).sha256)
    finally:
        close_sources(src)
