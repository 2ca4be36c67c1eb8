"""End to end on the real broker: a viral AI picture with NO metadata on any
copy is alerted through the detect role (the packaged pixel probe, on by
default), started by ``deepwatch replay`` because a model is enabled."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from tests.test_pipeline_e2e import deepwatch, query

pytestmark = pytest.mark.slow

# A FLUX.1-dev picture (ComfyUI example, re-encoded here so no copy keeps its metadata) the shipped head scores well above its
# operating threshold as a stripped re-post (asserted below, before the pipeline runs).
VIRAL_AI = "detect-dev/ai/flux_dev_example.png"
REAL = ["detect-dev2/real/google__dreambooth/dataset__vase__01.jpg"]
BASE = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _stripped(img: Image.Image, quality: int, scale: float = 1.0) -> bytes:
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)  # Pillow writes no EXIF/XMP unless asked
    return buf.getvalue()


def _feed(shared: Path, out: Path) -> tuple[Path, list[str]]:
    images = out / "images"
    images.mkdir(parents=True)
    src = Image.open(shared / VIRAL_AI)
    copies = {f"viral_q{q}_{int(s * 100)}.jpg": _stripped(src, q, s) for q, s in ((85, 1.0), (75, 1.0), (80, 0.8))}
    for name, data in copies.items():
        (images / name).write_bytes(data)
    lines, viral_ids = [], []

    def event(path: str, minutes: float, account: int) -> str:
        n = len(lines) + 1
        doc = {
            "schema_version": 1, "event_id": f"px-{n:04d}", "platform": "x", "post_id": f"p{n}",
            "post_url": f"https://x.example/post/{n}", "account_id": f"acct-{account}",
            "account_handle": f"@u{account}", "posted_at": (BASE + timedelta(minutes=minutes)).isoformat(),
            "text": "is this real?", "lang": "en", "hashtags": [], "image": {"path": path},
            "engagement": {"likes": 10, "reposts": 5, "replies": 0, "views": 400},
        }
        lines.append(json.dumps(doc))
        return doc["event_id"]

    names = sorted(copies)
    for i in range(14):
        viral_ids.append(event(f"images/{names[i % len(names)]}", i * 0.2, 100 + i))
    for k, rel in enumerate(REAL):
        name = f"real_{k}.jpg"
        (images / name).write_bytes(_stripped(Image.open(shared / rel), 85))
        event(f"images/{name}", 1 + k, 300 + k)
    feed = out / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    return feed, viral_ids


def test_stripped_viral_ai_picture_is_alerted_through_the_detect_role(shared_data: Path, tmp_path: Path) -> None:
    from detectors.imagedata import ImageData
    from detectors.models.pixel_detector import load_pixel_detector

    if not (shared_data / VIRAL_AI).is_file():
        pytest.skip(f"{VIRAL_AI} not in ../shared/data")
    feed, viral_ids = _feed(shared_data, tmp_path / "feed")
    # Precondition: the shipped head is confident on these copies (else the test would test nothing).
    det = load_pixel_detector(device="cpu")
    for f in sorted((feed.parent / "images").glob("viral_*.jpg")):
        ev = det.analyze(ImageData.from_path(f))[0]
        assert ev.data["flagged"], f"{f.name}: shipped head scores {ev.score:.2f} < threshold {det.threshold:.2f}"

    data = tmp_path / "data"
    r = deepwatch("replay", str(feed), "--data-dir", str(data), "--json", "--timeout", "300", timeout=420)
    assert r.returncode == 0, f"replay failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    clusters = query("clusters", data)
    alerts = query("alerts", data)
    viral = max(clusters, key=lambda c: c["sightings"])
    assert viral["sightings"] == len(viral_ids)
    kinds = {e.get("kind") for e in viral["evidence"]}
    assert kinds == {"model"}, f"only pixel evidence expected, got {viral['evidence']}"
    assert viral["evidence"][0]["detector"] == "model:pixel-probe-lite2"
    assert viral["verdict"] == "likely-ai" and viral["fake_score"] >= 0.7
    assert [a["cluster_id"] for a in alerts] == [viral["id"]]
