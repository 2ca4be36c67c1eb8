"""The published JSON Schema is what the code validates against, and it
accepts exactly the events the pipeline accepts."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from streams.demo_feed import build_feed
from streams.records import event_json_schema

PUBLISHED = Path(__file__).resolve().parents[1] / "streams" / "schemas" / "event-v1.schema.json"


def test_published_schema_matches_the_code():
    assert json.loads(PUBLISHED.read_text()) == event_json_schema(), "run `deepwatch schema --out streams/schemas/event-v1.schema.json`"


def test_schema_accepts_the_demo_events_and_rejects_a_missing_account(tmp_path):
    feed, _ = build_feed(tmp_path)
    validator = jsonschema.Draft202012Validator(json.loads(PUBLISHED.read_text()))
    docs = []
    for line in feed.read_text().splitlines():
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    good = [d for d in docs if d.get("event_id") != "evt-missing-account"]
    assert good and all(validator.is_valid(d) for d in good)
    bad = next(d for d in docs if d.get("event_id") == "evt-missing-account")
    assert not validator.is_valid(bad)


def test_schema_refuses_empty_image_fields_and_epoch_strings_as_the_worker_does():
    validator = jsonschema.Draft202012Validator(json.loads(PUBLISHED.read_text()))  # "format" not asserted
    good = {"event_id": "e1", "platform": "x", "account_id": "a", "posted_at": "2024-01-01T00:00:00Z",
            "image": {"url": "https://e.example/a.jpg"}}
    assert validator.is_valid(good)
    for image in ({"url": "https://e.example/a.jpg", "base64": ""}, {"url": "https://e.example/a.jpg", "path": ""},
                  {"url": ""}):
        assert not validator.is_valid({**good, "image": image}), image
    for posted_at in ("1700000000", "1700000000000", "2024-01-01"):
        assert not validator.is_valid({**good, "posted_at": posted_at}), posted_at
    for posted_at in ("2024-01-01 00:00:00+01:00", "2024-01-01t00:00:00.5z"):
        assert validator.is_valid({**good, "posted_at": posted_at}), posted_at


def test_published_alert_schema_is_current():
    from streams.records import alert_json_schema

    published = PUBLISHED.with_name("alert-v1.schema.json")
    assert json.loads(published.read_text()) == alert_json_schema(), \
        "run `deepwatch schema alert --out streams/schemas/alert-v1.schema.json`"


def test_an_event_id_with_control_characters_is_refused_and_never_names_a_dead_letter():
    # "tip-\x1b[31m\n-14" was accepted: an id is a key in stores, logs and terminal tables, where an
    # ESC sequence recoloured the operator's screen and a newline split log lines
    import pytest
    from pydantic import ValidationError

    from streams.records import ImageEvent, usable_event_id

    good = {"event_id": "tip-14", "platform": "x", "account_id": "a", "posted_at": "2026-01-01T00:00:00Z",
            "image": {"url": "https://example.org/a.jpg"}}
    assert ImageEvent.model_validate(good).event_id == "tip-14"
    for bad in ("tip-\x1b[31m-14", "tip\n14", "tip\x00", "tip\x9b31m", "tip\x7f"):
        with pytest.raises(ValidationError, match="control characters"):
            ImageEvent.model_validate({**good, "event_id": bad})
        assert usable_event_id(bad) is None
    assert usable_event_id("at://did:plc:abc/app.bsky.feed.post/3k#cid:bafy") is not None
