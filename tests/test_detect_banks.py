"""`deepwatch detect` fuses bank matches with the other evidence: a stripped
copy of a known fake scores as likely AI, an allow-listed picture counts
against."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from streams.cli import app
from streams.demo_feed import jpeg_bytes, scene


def test_detect_uses_banks_in_the_data_dir(tmp_path):
    fake, real = scene(6001), scene(6002)
    (tmp_path / "fake.png").write_bytes(jpeg_bytes(fake, 95))
    (tmp_path / "real.jpg").write_bytes(jpeg_bytes(real, 95))
    repost_fake, repost_real = tmp_path / "repost_fake.jpg", tmp_path / "repost_real.jpg"
    repost_fake.write_bytes(jpeg_bytes(fake.resize((384, 256)), 70))  # stripped, recompressed, resized
    repost_real.write_bytes(jpeg_bytes(real.resize((384, 256)), 70))
    data = tmp_path / "data"
    runner = CliRunner()
    for name, verdict, f in (("debunked", "fake", "fake.png"), ("wire", "authentic", "real.jpg")):
        r = runner.invoke(app, ["bank", "add", name, "--verdict", verdict, str(tmp_path / f), "--data-dir", str(data)])
        assert r.exit_code == 0, r.output

    r = runner.invoke(app, ["detect", str(repost_fake), str(repost_real), "--format", "json", "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    results = {o["path"].rsplit("/", 1)[-1]: o for o in json.loads(r.stdout)}
    fake_result, real_result = results["repost_fake.jpg"], results["repost_real.jpg"]
    assert fake_result["verdict"] == "likely-ai"
    assert any(e["detector"] == "bank:debunked" and "debunked" in e["detail"] for e in fake_result["evidence"])
    assert real_result["verdict"] == "no-evidence" and real_result["score"] < 0.2
    assert any(e["detector"] == "bank:wire" for e in real_result["evidence"])

    # Without the data dir's banks (and the pixel model) the stripped fake carries no evidence at all.
    r = runner.invoke(app, ["detect", str(repost_fake), "--format", "json", "--no-models", "--data-dir", str(tmp_path / "empty")])
    assert json.loads(r.stdout)[0]["verdict"] == "no-evidence"
