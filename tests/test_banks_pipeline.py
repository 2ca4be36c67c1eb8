"""Banks of known pictures on the real broker: a stripped repost of a known
fake is flagged through the fake bank, and an allow-listed picture never
alerts however fast it spreads (and says why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from streams.demo_feed import BASE_TIME, build_feed, jpeg_bytes, scene

pytestmark = pytest.mark.slow


def deepwatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def viral_feed(root: Path, picture_seed: int, n: int = 12) -> Path:
    """A picture with no metadata at all, going viral as plain JPEG reposts."""
    images = root / "images"
    images.mkdir(parents=True)
    pic = scene(picture_seed)
    (images / "a.jpg").write_bytes(jpeg_bytes(pic, 80))
    (images / "b.jpg").write_bytes(jpeg_bytes(pic.resize((pic.width // 2, pic.height // 2)), 75))
    lines = []
    for i in range(n):
        lines.append(json.dumps({
            "event_id": f"v{i}", "platform": "x", "account_id": f"acct{i}",
            "posted_at": (BASE_TIME + timedelta(seconds=15 * i)).isoformat(),
            "image": {"path": f"images/{'ab'[i % 2]}.jpg"},
        }))
    feed = root / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    return feed


def findings(data: Path) -> tuple[list[dict], list[dict]]:
    c = deepwatch("clusters", "--data-dir", str(data), "--format", "json")
    a = deepwatch("alerts", "--data-dir", str(data), "--format", "json")
    assert c.returncode == 0 and a.returncode == 0, c.stderr + a.stderr
    return json.loads(c.stdout), json.loads(a.stdout)


def test_fake_bank_flags_a_stripped_repost_and_alerts(tmp_path):
    feed = viral_feed(tmp_path / "feed", 5005)
    known = tmp_path / "debunked.png"
    scene(5005).save(known)  # the desk's copy of the debunked picture
    data = tmp_path / "data"
    r = deepwatch("bank", "add", "debunked", "--verdict", "fake", str(known), "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    r = deepwatch("replay", str(feed), "--data-dir", str(data), "--timeout", "240")
    assert r.returncode == 0, r.stderr[-3000:]
    clusters, alerts = findings(data)
    assert len(clusters) == 1
    c = clusters[0]
    bank_ev = [e for e in c["evidence"] if e["detector"] == "bank:debunked"]
    assert bank_ev and "debunked" in bank_ev[0]["detail"] and c["verdict"] == "likely-ai"
    assert len(alerts) == 1 and alerts[0]["cluster_id"] == c["id"]


def test_without_the_bank_the_same_feed_raises_nothing(tmp_path):
    feed = viral_feed(tmp_path / "feed", 5005)
    # The control for the bank tests: same feed, no bank, no learned model (a
    # synthetic scene is no photo, so the pixel probe's opinion of it says
    # nothing about banks; tests/test_pixel_pipeline.py covers that model).
    r = deepwatch("replay", str(feed), "--data-dir", str(tmp_path / "data"), "--timeout", "240",
                  env={"DEEPWATCH_DETECT__MODELS": "[]"})
    assert r.returncode == 0, r.stderr[-3000:]
    clusters, alerts = findings(tmp_path / "data")
    assert clusters[0]["verdict"] == "no-evidence" and alerts == []


def test_authentic_bank_suppresses_alerts_and_says_why(tmp_path):
    feed, exp = build_feed(tmp_path / "feed")
    data = tmp_path / "data"
    original = feed.parent / "images" / "flood_original.png"
    r = deepwatch("bank", "add", "wire-photos", "--verdict", "authentic", str(original), "--data-dir", str(data))
    assert r.returncode == 0, r.stderr
    r = deepwatch("replay", str(feed), "--data-dir", str(data), "--timeout", "240")
    assert r.returncode == 0, r.stderr[-3000:]
    clusters, alerts = findings(data)
    fake = next(c for c in clusters if exp.viral_fake_sha256 in {m["sha256"] for m in c["members"]})
    assert alerts == []
    assert fake["suppressed"] and "wire-photos" in fake["suppressed"]
    assert any(e["detector"] == "bank:wire-photos" for e in fake["evidence"])
