"""Store reads are typed records read by attribute: none of them reads like
the dict rows it replaced (``record["field"]``, ``.get``, ``.keys()``,
``.items()`` each dumped the whole record to JSON, and a misspelt key was
found only at run time); ``as_json`` gives the JSON object where one is
wanted (the CLI's and the API's answers); and each is versioned
(``schema_version``), a row stored before records were versioned reading as
version 1."""

from __future__ import annotations

from datetime import timedelta

import pytest

from streams.findings import (
    AccountAggregate, AccountWindow, AlertRecord, ClusterRecord, DeadLetterRecord, DeliveryRecord, DeliveryState,
    SightingRecord, _ReadRecord,
)
from streams.records import Alert, Velocity
from tests.findings_fixture import T0, fill, filled_store

HOOK = "https://hook.example.org/alerts"


def _write(store) -> None:
    fill(store)
    store.mark_delivered("c-fire:1", HOOK, DeliveryState.FAILED, "HTTP 503")


@pytest.fixture(params=["sqlite", "es"])
def store(request, tmp_path):
    yield from filled_store(request, tmp_path, request.param, write=_write)


def _every_read(store) -> dict[str, list[_ReadRecord]]:
    """One of each record every store read gives."""
    getattr(store, "refresh", lambda: None)()
    return {
        "clusters": store.clusters(include_merged=True), "alerts": list(store.alerts()),
        "dead_letters": list(store.dead_letters()), "sightings": store.sightings(),
        "cluster_sightings": store.cluster_sightings("c-fire"),
        "account_aggregates": store.account_aggregates(["c-fire"], min_posts=0),
        "account_windows": store.account_windows(timedelta(days=1), ["c-fire"]),
        "delivery_status": [d for ds in store.delivery_status().values() for d in ds],
    }


def test_no_record_reads_like_a_dict(store):
    reads = _every_read(store)
    assert all(reads.values()), {k: len(v) for k, v in reads.items()}  # each read gave records to check
    for what, records in reads.items():
        for rec in records:
            name = next(iter(type(rec).model_fields))
            with pytest.raises(TypeError):
                rec[name]  # noqa: B018
            with pytest.raises(TypeError, match="attribute"):
                name in rec  # noqa: B015  # pydantic's own iteration would answer False, silently
            for method in ("get", "keys", "items"):
                assert not hasattr(rec, method), (what, method)


def test_the_replay_summary_reads_alerts_and_dead_letters_by_attribute(tmp_path):
    """`deepwatch replay`'s summary: dead letters counted by stage and
    reason, and an alert's latency from its trigger's ingest to its
    creation, both read off the typed records."""
    from streams.runner import summarize
    from streams.settings import Settings
    from streams.store import open_store

    settings = Settings(data_dir=tmp_path)
    store = open_store(tmp_path)
    fill(store)
    store.add_alert(Alert(alert_id="c-pope:1", cluster_id="c-pope", rule="viral_fake", level=1, fake_score=0.9,
                          verdict="likely-ai", velocity=Velocity(sightings_5m=12), sightings=12, accounts=12,
                          evidence=[], at=T0, trigger_event_id="e1", trigger_ingested_at=T0 + timedelta(seconds=1),
                          created_at=T0 + timedelta(seconds=3, milliseconds=250)))
    store.close()
    summary = summarize(settings, events=0, produced=set(), refused=0, seconds=1.0, complete=True)
    assert summary.dead_letters == {"fetch:fetch_blocked": 1}
    assert summary.alert_latency_s == [2.25]  # the fixture's own alert has no trigger time: not counted
    assert summary.alerts == 2
    later = summarize(settings, events=0, produced=set(), refused=0, seconds=1.0, complete=True,
                      started_at=T0 + timedelta(seconds=4))
    assert later.alert_latency_s == []  # raised before this run started


# ------------------------------------------------------------- versions
EVERY_RECORD = {ClusterRecord, AlertRecord, DeadLetterRecord, SightingRecord, AccountAggregate, AccountWindow,
                DeliveryRecord}


def test_every_read_record_type_is_versioned():
    assert set(_ReadRecord.__subclasses__()) == EVERY_RECORD  # a new read record is added here, versioned
    for cls in EVERY_RECORD:
        field = cls.model_fields.get("schema_version")
        assert field is not None and field.default == 1, cls.__name__


def test_each_record_carries_its_version_read_back(store):
    records = [r for rs in _every_read(store).values() for r in rs]
    assert {type(r) for r in records} == EVERY_RECORD  # the store gave one of each to check
    for rec in records:
        assert rec.schema_version == 1, type(rec).__name__
        assert rec.as_json()["schema_version"] == 1, type(rec).__name__


def test_an_unversioned_es_document_still_reads(fake_es, tmp_path, request):
    """Documents stored before they carried a version (or whose version the
    read leaves out of ``_source``) read as version 1."""
    for s in filled_store(request, tmp_path, "es", write=_write):
        for docs in fake_es.docs.values():
            for doc in docs.values():
                if isinstance(doc, dict):
                    doc.pop("schema_version", None)
        records = [r for rs in _every_read(s).values() for r in rs]
        assert {type(r) for r in records} == EVERY_RECORD
        assert all(r.schema_version == 1 for r in records)


@pytest.mark.parametrize("version", [None, 1])
def test_a_row_without_a_version_validates(version):
    row = {"target": HOOK, "state": "failed", "detail": "HTTP 503", "at": "2026-01-01T00:00:00+00:00"}
    if version is not None:
        row["schema_version"] = version
    assert DeliveryRecord.model_validate(row).schema_version == 1
    assert DeliveryRecord.model_validate({**row, "schema_version": None}).schema_version == 1
