"""An account id with control characters is refused at validation, as an
event id is: `"@evil\\r\\nSet-Cookie: x=1"` was accepted and stored, and the
desk then could not open that account (404, or 422 for the control in
``?id=``). The account id is the desk's key for an account (its page's path,
``?id=``, the search's ``account=``), and a key in stores, log lines and
terminal tables."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import jsonschema
import pytest
from pydantic import ValidationError

from streams.records import ImageEvent, event_json_schema
from tests.desk_support import REPO

GOOD = {"event_id": "e1", "platform": "x", "account_id": "acct", "posted_at": "2026-12-01T10:00:00Z",
        "image": {"url": "https://example.org/a.jpg"}}
BAD = ("@evil\r\nSet-Cookie: x=1", "a\x00", "a\x1b[31m", "a\x7f", "a\x85b", "a\x9b31m", "\t")


@pytest.mark.parametrize("account", BAD)
def test_an_account_id_with_a_control_character_is_refused(account):
    with pytest.raises(ValidationError) as e:
        ImageEvent.model_validate({**GOOD, "account_id": account})
    [err] = e.value.errors()
    assert err["loc"] == ("account_id",) and "must not contain control characters" in err["msg"]
    assert not jsonschema.Draft202012Validator(event_json_schema()).is_valid({**GOOD, "account_id": account})


@pytest.mark.parametrize("account", ["@alice@mastodon.social", "did:plc:abc123", "名前 with spaces", "a/../b", "é"])
def test_printable_account_ids_are_kept(account):
    assert ImageEvent.model_validate({**GOOD, "account_id": account}).account_id == account
    assert jsonschema.Draft202012Validator(event_json_schema()).is_valid({**GOOD, "account_id": account})


def test_a_feed_event_with_such_an_account_is_a_dead_letter_at_validate(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (160, 120), (200, 30, 60)).save(tmp_path / "images" / "p.jpg")
    event = {**GOOD, "image": {"path": "images/p.jpg"}}
    lines = [json.dumps(event), json.dumps({**event, "event_id": "e2", "account_id": BAD[0]})]
    (tmp_path / "feed.jsonl").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def deepwatch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args, "--data-dir", str(data)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)

    r = deepwatch("replay", "feed.jsonl", "--workers", "1", "--no-wait-models")
    assert r.returncode == 0 and "1 new sightings" in " ".join(r.stderr.split()), r.stderr[-3000:]
    r = deepwatch("dead-letters", "--json")
    [dead] = json.loads(r.stdout)
    assert (dead["event_id"], dead["stage"], dead["reason"]) == ("e2", "validate", "schema_violation"), dead
    assert dead["detail"] == "account_id: Value error, must not contain control characters", dead
    db = sqlite3.connect(data / "findings.sqlite")
    try:
        assert [a for a, in db.execute("SELECT account_id FROM sightings")] == ["acct"]
    finally:
        db.close()
