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
