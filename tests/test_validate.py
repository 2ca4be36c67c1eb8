"""parse_event: the first stage decides what is an event and says why not."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from streams.validate import MAX_EVENT_BYTES, InvalidEvent, parse_event

GOOD = {
    "schema_version": 1, "event_id": "evt-1", "platform": "x", "account_id": "acct-1",
    "posted_at": "2026-11-20T10:00:00+00:00", "image": {"url": "https://cdn.example/a.jpg"},
}


def _raw(doc) -> bytes:
    return json.dumps(doc).encode()


def _invalid(raw: bytes) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    return info.value


def test_valid_event_parses():
    ev = parse_event(_raw(GOOD))
    assert ev.event_id == "evt-1" and ev.image.url == "https://cdn.example/a.jpg"
    assert ev.engagement.total == 0


def test_schema_version_defaults_to_1():
    doc = {k: v for k, v in GOOD.items() if k != "schema_version"}
    assert parse_event(_raw(doc)).schema_version == 1


@pytest.mark.parametrize("raw", [b"{this is not json", b"", b"\xff\xfe\x00garbage", b'{"a": 1'])
def test_malformed_json(raw):
    err = _invalid(raw)
    assert err.reason == "malformed_json"
    assert err.event_id is None


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"a string"', b"42", b"null"])
def test_non_object_json(raw):
    err = _invalid(raw)
    assert err.reason == "malformed_json"
    assert "JSON object" in err.detail


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unsupported_version_keeps_event_id(version):
    err = _invalid(_raw({**GOOD, "schema_version": version}))
    assert err.reason == "unsupported_version"
    assert err.event_id == "evt-1"
    assert repr(version) in err.detail


def test_missing_field_names_the_field():
    doc = {k: v for k, v in GOOD.items() if k != "account_id"}
    err = _invalid(_raw(doc))
    assert err.reason == "schema_violation"
    assert err.event_id == "evt-1"
    assert "account_id" in err.detail and "required" in err.detail.lower()


def test_naive_timestamp_rejected():
    err = _invalid(_raw({**GOOD, "posted_at": "2026-11-20T10:00:00"}))
    assert err.reason == "schema_violation"
    assert "posted_at" in err.detail and "timezone" in err.detail.lower()


def test_unknown_top_level_field_is_ignored_but_nested_one_rejected():
    # Forward compatibility: a producer may add top-level fields first.
    ev = parse_event(_raw({**GOOD, "surprise": True}))
    assert ev.event_id == GOOD["event_id"] and "surprise" not in ev.model_dump()
    err = _invalid(_raw({**GOOD, "engagement": {"likes": 1, "surprise": 2}}))
    assert err.reason == "schema_violation"
    assert "surprise" in err.detail


def test_image_needs_exactly_one_source():
    err = _invalid(_raw({**GOOD, "image": {"url": "https://a/b.jpg", "path": "b.jpg"}}))
    assert err.reason == "schema_violation"
    assert "exactly one" in err.detail and "image" in err.detail
    err = _invalid(_raw({**GOOD, "image": {}}))
    assert "exactly one" in err.detail


def test_non_http_url_rejected():
    err = _invalid(_raw({**GOOD, "image": {"url": "file:///etc/passwd"}}))
    assert err.reason == "schema_violation" and "http" in err.detail


def test_negative_engagement_rejected():
    err = _invalid(_raw({**GOOD, "engagement": {"likes": -1}}))
    assert err.reason == "schema_violation"
    assert "engagement.likes" in err.detail


def test_non_string_event_id_not_reported_as_id():
    err = _invalid(_raw({**GOOD, "event_id": 12345}))
    assert err.reason == "schema_violation"
    assert err.event_id is None
    assert "event_id" in err.detail


def test_detail_lists_at_most_five_problems():
    doc = {"schema_version": 1, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}
    err = _invalid(_raw(doc))
    assert err.reason == "schema_violation"
    assert err.detail.count(";") == 4


def test_oversized_event_refused_before_parsing():
    raw = b" " * (MAX_EVENT_BYTES + 1)
    err = _invalid(raw)
    assert err.reason == "too_large"


@pytest.mark.parametrize("engagement", [{"likes": "5"}, {"likes": True}, {"views": False}, {"replies": None}])
def test_a_count_of_another_json_type_is_refused_not_converted(engagement):
    err = _invalid(_raw({**GOOD, "engagement": engagement}))
    assert err.reason == "schema_violation" and err.event_id == "evt-1"
    key = next(iter(engagement))
    assert f"engagement.{key}: must be an integer" in err.detail


def test_schema_version_true_is_not_version_1():
    err = _invalid(_raw({**GOOD, "schema_version": True}))
    assert err.reason == "unsupported_version" and "True" in err.detail


@pytest.mark.parametrize("posted_at", [1_700_000_000, 0, 1.5])
def test_a_number_for_posted_at_is_refused_not_read_as_epoch_seconds(posted_at):
    err = _invalid(_raw({**GOOD, "posted_at": posted_at}))
    assert err.reason == "schema_violation" and "posted_at: must be a date-time string" in err.detail


@pytest.mark.parametrize("posted_at", ["1700000000", "1700000000000", "1700000000.5", "-1", "0", "2024-01-01",
                                       " 2024-01-01T00:00:00Z", "T10:00:00Z"])
def test_a_string_that_is_not_an_iso_date_time_is_refused(posted_at):
    # pydantic's lax mode read "1700000000" as 2023-11-14T22:13:20Z.
    err = _invalid(_raw({**GOOD, "posted_at": posted_at}))
    assert err.reason == "schema_violation"
    assert "posted_at: Value error, must be an ISO 8601 date-time with a UTC offset" in err.detail


@pytest.mark.parametrize("posted_at, iso", [
    ("2024-01-01T00:00:00Z", "2024-01-01T00:00:00+00:00"),
    ("2024-01-01t00:00:00z", "2024-01-01T00:00:00+00:00"),
    ("2024-01-01 10:30:00+01:00", "2024-01-01T10:30:00+01:00"),
    ("2024-01-01T10:30Z", "2024-01-01T10:30:00+00:00"),
    ("2024-01-01T10:30:00.123456-05:30", "2024-01-01T10:30:00.123456-05:30"),
    ("2024-01-01T10:30:00+0100", "2024-01-01T10:30:00+01:00"),
    ("2024-01-01T00:00:00-00:00", "2024-01-01T00:00:00+00:00"),
])
def test_iso_date_times_are_still_read(posted_at, iso):
    assert parse_event(_raw({**GOOD, "posted_at": posted_at})).posted_at.isoformat() == iso


@pytest.mark.parametrize("image, field", [
    ({"url": "https://cdn.example/a.jpg", "base64": ""}, "base64"),
    ({"url": "https://cdn.example/a.jpg", "path": ""}, "path"),
    ({"url": "", "base64": "iVBORw0KGgo="}, "url"),
    ({"path": ""}, "path"),
])
def test_an_empty_image_field_is_refused_not_taken_as_absent(image, field):
    # {"url": ..., "base64": ""} validated as a URL image and was then fetched
    # as an empty inline one ("empty"); with "path": "" the image root itself
    # was read ("not_a_file ... is a directory").
    err = _invalid(_raw({**GOOD, "image": image}))
    assert err.reason == "schema_violation"
    assert f"image.{field}: String should have at least 1 character" in err.detail


def test_an_integral_float_count_is_an_integer_as_in_json_schema():
    assert parse_event(_raw({**GOOD, "engagement": {"likes": 5.0}})).engagement.likes == 5


# Every JSON type in every field: what the worker accepts, the published schema
# accepts. The worker may refuse more (one image source, an http(s) URL, a real
# date-time): those are rules the schema cannot state.
_KINDS = [True, False, 0, 1, 1.0, 1.5, -1, "1", "x", None, [], {}, ["a"], "2026-11-20T10:00:00Z", 1_700_000_000, 2**53 + 1,
          "", "1700000000"]
_FIELDS = ["schema_version", "event_id", "platform", "post_id", "post_url", "account_id", "account_handle",
           "posted_at", "text", "lang", "hashtags", "engagement", "image", "engagement.likes", "engagement.reposts",
           "engagement.replies", "engagement.views", "image.url", "image.mime", "image.blob", "hashtags.0",
           "image.base64", "image.path"]


def _with(field: str, value) -> dict:
    doc = json.loads(json.dumps(GOOD))
    *outer, last = field.split(".")
    at = doc
    for key in outer:
        at = at.setdefault(key, {} if key != "hashtags" else [])
    if isinstance(at, list):
        at.append(value)
    else:
        at[last] = value
    return doc


def test_the_worker_accepts_no_event_the_published_schema_refuses():
    published = Path(__file__).resolve().parents[1] / "streams" / "schemas" / "event-v1.schema.json"
    validator = jsonschema.Draft202012Validator(json.loads(published.read_text()))
    disagree = []
    for field in _FIELDS:
        for value in _KINDS:
            doc = _with(field, value)
            try:
                parse_event(_raw(doc))
            except InvalidEvent:
                continue
            if not validator.is_valid(doc):
                disagree.append(f"{field}={value!r}")
    assert not disagree
