"""Vendor plugins against a local server speaking their documented response shapes."""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from detectors.imagedata import ImageData
from detectors.models.vendors import (
    HiveDetector,
    RealityDefenderDetector,
    SensityDetector,
    VendorError,
    create_vendor,
    enabled_vendors,
)

KEY = "sk-test-secret-123"


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []
    fail = False

    def log_message(self, *a: object) -> None:
        pass

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self) -> None:
        body = self._body()
        self.seen.append({"path": self.path, "headers": dict(self.headers), "len": len(body)})
        if self.fail:
            return self._send(500, {"error": "boom"})
        if self.path == "/api/v2/task/sync":
            assert self.headers["Authorization"] == f"Token {KEY}"
            return self._send(200, {"id": "t1", "status": [{"status": {"code": "0", "message": "SUCCESS"},
                "response": {"output": [{"time": 0, "classes": [
                    {"class": "ai_generated", "score": 0.93}, {"class": "not_ai_generated", "score": 0.07},
                    {"class": "midjourney", "score": 0.81}, {"class": "dalle", "score": 0.05}]}]}}]})
        if self.path == "/tasks/ai_generated_image_detection":
            assert self.headers["Authorization"] == f"Bearer {KEY}"
            return self._send(200, {"report_id": "r42"})
        if self.path == "/api/files/aws-presigned":
            assert self.headers["X-API-KEY"] == KEY
            port = self.server.server_address[1]
            return self._send(200, {"code": "ok", "errno": 0, "mediaId": "m1", "requestId": "q1",
                                    "response": {"signedUrl": f"http://127.0.0.1:{port}/upload/m1"}})
        self._send(404, {})

    def do_PUT(self) -> None:
        body = self._body()
        self.seen.append({"path": self.path, "headers": dict(self.headers), "len": len(body)})
        self._send(200, {})

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, "headers": dict(self.headers), "len": 0})
        if self.path == "/tasks/ai_generated_image_detection/r42":
            polls = sum(1 for s in self.seen if s["path"] == self.path)
            if polls < 2:
                return self._send(200, {"status": "in_progress"})
            return self._send(200, {"status": "completed", "result": {"class_probability": 0.88, "label": "fake"}})
        if self.path == "/api/media/users/q1":
            return self._send(200, {"resultsSummary": {"status": "MANIPULATED", "metadata": {"finalScore": 76.5}}})
        self._send(404, {})


@pytest.fixture()
def server() -> Iterator[str]:
    _Handler.seen = []
    _Handler.fail = False
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _image() -> ImageData:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="JPEG")
    return ImageData(buf.getvalue())


def test_hive(server: str) -> None:
    [ev] = HiveDetector(api_key=KEY, base_url=server).analyze(_image())
    assert ev.detector == "vendor:hive" and ev.score == pytest.approx(0.93)
    assert ev.data["source"] == "midjourney"
    assert KEY not in ev.model_dump_json()


def test_sensity_polls(server: str) -> None:
    [ev] = SensityDetector(api_key=KEY, base_url=server, poll_interval_s=0.01).analyze(_image())
    assert ev.detector == "vendor:sensity" and ev.score == pytest.approx(0.88)


def test_reality_defender_presigned_flow(server: str) -> None:
    [ev] = RealityDefenderDetector(api_key=KEY, base_url=server, poll_interval_s=0.01).analyze(_image())
    assert ev.score == pytest.approx(0.765) and ev.data["status"] == "MANIPULATED"
    upload = [s for s in _Handler.seen if s["path"] == "/upload/m1"][0]
    assert upload["len"] > 0 and "X-API-KEY" not in upload["headers"]  # key never sent to the bucket


def test_outage_gives_no_evidence_and_no_secret_in_logs(server: str, caplog: pytest.LogCaptureFixture) -> None:
    _Handler.fail = True
    with caplog.at_level(logging.DEBUG):
        assert HiveDetector(api_key=KEY, base_url=server).predict_batch([_image()]) == []
    assert "vendor:hive failed" in caplog.text
    assert KEY not in caplog.text
    assert KEY not in repr(HiveDetector(api_key=KEY, base_url=server))


def test_off_without_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("HIVE_API_KEY", "SENSITY_API_TOKEN", "REALITY_DEFENDER_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(VendorError, match="HIVE_API_KEY"):
        create_vendor("vendor:hive")
    assert enabled_vendors(["vendor:hive", "vendor:sensity", "vendor:reality-defender"]) == []
    monkeypatch.setenv("HIVE_API_KEY", KEY)
    assert enabled_vendors(["vendor:hive", "model:x"]) == ["vendor:hive"]
    assert isinstance(create_vendor("vendor:hive"), HiveDetector)


def test_a_mistyped_model_or_vendor_name_says_what_it_could_have_meant(tmp_path) -> None:
    from detectors.models import load_detector

    # read as a model to fetch, it said "use letters, digits, ..." and nothing of the vendors
    with pytest.raises(ValueError, match=r"did you mean 'vendor:hive'\?"):
        load_detector("vendor:hiv", model_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"did you mean 'pixel-probe-lite2'\?"):
        load_detector("pixel-probe-lite", model_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"packaged models: pixel-probe-lite2; vendor plugins: vendor:hive, "):
        load_detector("zzz", model_dir=tmp_path)


def test_a_vendor_calls_the_base_url_it_is_given_not_an_environment_variable(monkeypatch, server, tmp_path) -> None:
    from detectors.models import load_detector

    monkeypatch.setenv("HIVE_API_KEY", KEY)
    monkeypatch.setenv("DEEPWATCH_HIVE_URL", "http://127.0.0.1:9")  # once read here; now detect.vendor_urls
    assert load_detector("vendor:hive", model_dir=tmp_path).base_url == HiveDetector.default_base_url
    det = load_detector("vendor:hive", model_dir=tmp_path, vendor_urls={"vendor:hive": server + "/"})
    assert det.base_url == server
    [ev] = det.predict_batch([_image()])
    assert ev.score == pytest.approx(0.93) and [s["path"] for s in _Handler.seen] == ["/api/v2/task/sync"]


def test_detect_vendor_urls_reaches_the_vendor_through_the_cli(server, tmp_path) -> None:
    # the real settings path: DEEPWATCH_DETECT__VENDOR_URLS -> `deepwatch detect` -> the plugin's requests
    root = Path(__file__).resolve().parents[1]
    picture = tmp_path / "p.jpg"
    picture.write_bytes(_image().data)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    env.update({"PYTHONPATH": str(root), "HIVE_API_KEY": KEY, "DEEPWATCH_DETECT__MODELS": '["vendor:hive"]',
                "DEEPWATCH_DETECT__VENDOR_URLS": json.dumps({"vendor:hive": server})})
    r = subprocess.run([sys.executable, "-m", "streams.cli", "detect", str(picture), "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert r.returncode == 0, r.stderr
    [result] = json.loads(r.stdout)
    assert any(e["detector"] == "vendor:hive" and e["score"] == pytest.approx(0.93) for e in result["evidence"]), result
    assert "/api/v2/task/sync" in [s["path"] for s in _Handler.seen]


def test_a_vendor_over_plain_http_off_this_machine_is_warned_of_once(caplog: pytest.LogCaptureFixture) -> None:
    # the API key rides in a header of every request: off loopback, plain http shows it to the network between
    with caplog.at_level(logging.WARNING, logger="detectors.models.vendors"):
        HiveDetector(api_key=KEY, base_url="http://hive-proxy.internal:8080")
    said = [r.getMessage() for r in caplog.records if "plain http" in r.getMessage()]
    assert len(said) == 1 and HiveDetector.key_env in said[0], said
    assert KEY not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detectors.models.vendors"):
        for quiet in ("https://hive-proxy.internal", "http://127.0.0.1:9000", "http://[::1]:9000", "http://localhost:9"):
            HiveDetector(api_key=KEY, base_url=quiet)
    assert "plain http" not in caplog.text
