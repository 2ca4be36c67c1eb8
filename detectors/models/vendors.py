"""Commercial detection APIs as optional plugins (Hive, Sensity, Reality Defender).

Off by default: a vendor runs only when it is configured (listed in
``detect.models`` as ``vendor:hive`` etc.) AND its API key is in the
environment. Keys are read from the environment only, sent only in request
headers and never logged or put in evidence. Another endpoint than the
vendor's public API is the caller's ``base_url`` (the settings'
``detect.vendor_urls``). Every request has a bounded timeout; polling
vendors have a bounded total wait.

Response shapes follow the vendors' public docs/SDKs as found; where a field
name is not certain it is marked UNSURE and parsed defensively.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from typing import Any, ClassVar

import httpx

from detectors.base import Evidence, EvidenceKind
from detectors.imagedata import ImageData
from detectors.models.detector import BatchDetector

log = logging.getLogger(__name__)

# A vendor's probability is informative but opaque; same weight as our models.
VENDOR_WEIGHT = 1.0


class VendorError(RuntimeError):
    pass


def _cleartext(url: str) -> bool:
    """An http:// address off this machine (a loopback proxy is this machine's own business)."""
    parts = httpx.URL(url)
    if parts.scheme != "http":
        return False
    host = parts.host
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class VendorDetector(BatchDetector):
    key_env: ClassVar[str]
    kind: ClassVar[EvidenceKind] = EvidenceKind.VENDOR
    default_base_url: ClassVar[str]

    def __init__(self, api_key: str | None = None, base_url: str | None = None, timeout_s: float = 20.0,
                 max_wait_s: float = 60.0, poll_interval_s: float = 2.0):
        key = api_key or os.environ.get(self.key_env)
        if not key:
            raise VendorError(f"{self.name} is not enabled: set {self.key_env} in the environment")
        self._key = key
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        if _cleartext(self.base_url):
            # the key rides in a header of every request, and the pictures in the body
            log.warning(f"{self.name} at {self.base_url} is plain http: its API key ({self.key_env}) and the pictures "
                        "cross the network in clear text; use https:// unless the network between is trusted",
                        extra={"vendor": self.name, "url": self.base_url})
        self.timeout = httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))
        self.max_wait_s, self.poll_interval_s = max_wait_s, poll_interval_s
        # One client per plugin: the detect worker calls predict_batch per batch,
        # and a client per call would pay a TCP+TLS handshake every time.
        self._http = httpx.Client(timeout=self.timeout, follow_redirects=False)

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _score(self, client: httpx.Client, image: ImageData) -> tuple[float, dict[str, Any]]:
        raise NotImplementedError

    def _check(self, r: httpx.Response, what: str) -> Any:
        if r.status_code >= 400:
            # Status only: response bodies can echo request headers on some gateways.
            raise VendorError(f"{self.name}: {what} -> HTTP {r.status_code}")
        try:
            return r.json()
        except ValueError as e:
            raise VendorError(f"{self.name}: {what} returned non-JSON") from e

    def analyze(self, image: ImageData) -> list[Evidence]:
        return self.predict_batch([image])

    def predict_batch(self, images: list[ImageData]) -> list[Evidence]:
        out = []
        for im in images:
            try:
                score, data = self._score(self._http, im)
            except (httpx.HTTPError, VendorError, KeyError, IndexError, TypeError, ValueError) as e:
                # A vendor outage must not fail the cluster: no evidence = no opinion.
                log.warning("%s failed for %s: %s", self.name, im.sha256[:12], type(e).__name__)
                continue
            score = min(1.0, max(0.0, float(score)))
            out.append(Evidence(detector=self.name, kind=self.kind, score=score, weight=VENDOR_WEIGHT, sha256=im.sha256,
                                detail=f"{self.label}: {score:.2f} (vendor score)", data=data))
        return out

    label: ClassVar[str] = "vendor"


def _filename(image: ImageData) -> str:
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}.get(image.format, "bin")
    return f"image.{ext}"


class HiveDetector(VendorDetector):
    """Hive AI-generated image detection, sync task API (docs.thehive.ai,
    "submit a task synchronously"): ``POST /api/v2/task/sync`` with
    ``Authorization: Token <key>`` and multipart ``media``. Response:
    ``status[0].response.output[0].classes = [{"class": ..., "score": ...}]``;
    the AI head's classes are ``ai_generated`` / ``not_ai_generated``, the
    other head names the source generator (UNSURE of the full class list)."""

    name: ClassVar[str] = "vendor:hive"
    label: ClassVar[str] = "Hive"
    key_env: ClassVar[str] = "HIVE_API_KEY"
    default_base_url: ClassVar[str] = "https://api.thehive.ai"

    def _score(self, client: httpx.Client, image: ImageData) -> tuple[float, dict[str, Any]]:
        r = client.post(
            f"{self.base_url}/api/v2/task/sync",
            headers={"Authorization": f"Token {self._key}", "Accept": "application/json"},
            files={"media": (_filename(image), image.data)},
        )
        body = self._check(r, "task/sync")
        classes = body["status"][0]["response"]["output"][0]["classes"]
        scores = {c["class"]: float(c["score"]) for c in classes}
        if "ai_generated" not in scores:
            raise VendorError("hive: no ai_generated class in response")
        known = {"ai_generated", "not_ai_generated", "none", "inconclusive"}
        sources = {k: v for k, v in scores.items() if k not in known}
        top = max(sources.items(), key=lambda kv: kv[1]) if sources else None
        data: dict[str, Any] = {"vendor": "hive"}
        if top and top[1] >= 0.5:
            data["source"], data["source_score"] = top
        return scores["ai_generated"], data


class SensityDetector(VendorDetector):
    """Sensity (docs.sensity.ai): Bearer token; create a task, then fetch its
    result. UNSURE: exact service path and result field names; we use
    ``POST /tasks/ai_generated_image_detection`` (multipart ``file``) returning
    ``{"report_id"|"id": ...}`` and ``GET /tasks/ai_generated_image_detection/{id}``
    returning ``{"status": "completed", "result": {"class_probability": p,
    "label": "fake"|"real"}}``. Confirm against the OpenAPI spec before relying on it."""

    name: ClassVar[str] = "vendor:sensity"
    label: ClassVar[str] = "Sensity"
    key_env: ClassVar[str] = "SENSITY_API_TOKEN"
    default_base_url: ClassVar[str] = "https://api.sensity.ai"
    service: ClassVar[str] = "ai_generated_image_detection"

    def _score(self, client: httpx.Client, image: ImageData) -> tuple[float, dict[str, Any]]:
        h = {"Authorization": f"Bearer {self._key}"}
        body = self._check(
            client.post(f"{self.base_url}/tasks/{self.service}", headers=h,
                        files={"file": (_filename(image), image.data)}),
            "create task",
        )
        task_id = body.get("report_id") or body.get("id")
        if not task_id:
            raise VendorError("sensity: no task id in response")
        deadline = time.monotonic() + self.max_wait_s
        while True:
            res = self._check(client.get(f"{self.base_url}/tasks/{self.service}/{task_id}", headers=h), "get result")
            status = str(res.get("status", "")).lower()
            if status == "completed":
                result = res["result"]
                p = float(result["class_probability"])
                label = str(result.get("label", "")).lower()
                # UNSURE: whether class_probability is P(fake) or P(label); normalise to P(fake).
                score = p if label in ("fake", "ai", "") else 1.0 - p
                return score, {"vendor": "sensity", "label": label, "task_id": str(task_id)}
            if status in ("failed", "error"):
                raise VendorError("sensity: task failed")
            if time.monotonic() > deadline:
                raise VendorError("sensity: result not ready in time")
            time.sleep(self.poll_interval_s)


class RealityDefenderDetector(VendorDetector):
    """Reality Defender (official SDKs): ``POST /api/files/aws-presigned``
    ``{"fileName"}`` with ``X-API-KEY`` -> ``{"response": {"signedUrl"},
    "mediaId", "requestId"}``; ``PUT`` the bytes to ``signedUrl``; poll
    ``GET /api/media/users/{requestId}`` until ``resultsSummary.status`` is
    final (ARTIFICIAL/MANIPULATED/FAKE, AUTHENTIC, NOT_APPLICABLE,
    UNABLE_TO_EVALUATE). Score: ``resultsSummary.metadata.finalScore`` (0-100).
    UNSURE: the exact final status names vary across SDK versions."""

    name: ClassVar[str] = "vendor:reality-defender"
    label: ClassVar[str] = "Reality Defender"
    key_env: ClassVar[str] = "REALITY_DEFENDER_API_KEY"
    default_base_url: ClassVar[str] = "https://api.prd.realitydefender.xyz"

    def _score(self, client: httpx.Client, image: ImageData) -> tuple[float, dict[str, Any]]:
        h = {"X-API-KEY": self._key}
        up = self._check(
            client.post(f"{self.base_url}/api/files/aws-presigned", headers=h, json={"fileName": _filename(image)}),
            "presign",
        )
        signed, request_id = up["response"]["signedUrl"], up["requestId"]
        put = client.put(signed, content=image.data)  # presigned URL: no API key sent there
        if put.status_code >= 400:
            raise VendorError(f"reality-defender: upload -> HTTP {put.status_code}")
        deadline = time.monotonic() + self.max_wait_s
        while True:
            res = self._check(client.get(f"{self.base_url}/api/media/users/{request_id}", headers=h), "get result")
            summary = res.get("resultsSummary") or {}
            status = str(summary.get("status", "")).upper()
            if status in ("NOT_APPLICABLE", "UNABLE_TO_EVALUATE"):
                raise VendorError(f"reality-defender: {status.lower()}")
            if status and status not in ("ANALYZING", "PROCESSING", "QUEUED"):
                final = (summary.get("metadata") or {}).get("finalScore")
                if final is None:
                    raise VendorError("reality-defender: no finalScore")
                return float(final) / 100.0, {"vendor": "reality-defender", "status": status,
                                              "request_id": str(request_id)}
            if time.monotonic() > deadline:
                raise VendorError("reality-defender: result not ready in time")
            time.sleep(self.poll_interval_s)


VENDORS: dict[str, type[VendorDetector]] = {
    c.name: c for c in (HiveDetector, SensityDetector, RealityDefenderDetector)
}


def create_vendor(name: str, **kwargs: Any) -> VendorDetector:
    try:
        cls = VENDORS[name]
    except KeyError:
        raise KeyError(f"unknown vendor {name!r}; known: {', '.join(sorted(VENDORS))}") from None
    return cls(**kwargs)


def enabled_vendors(configured: list[str]) -> list[str]:
    """Configured vendor names whose API key is present (the others are skipped, with a log line)."""
    out = []
    for n in configured:
        cls = VENDORS.get(n)
        if cls is None:
            continue
        if os.environ.get(cls.key_env):
            out.append(n)
        else:
            log.info("%s configured but %s is not set; skipping it", n, cls.key_env)
    return out
