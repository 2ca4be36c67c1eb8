"""C2PA Content Credentials: the strongest provenance signal there is, when present.

Read with c2pa-python, fully offline: remote manifest fetching and OCSP are off
(a monitor must not let an image it is analysing make it call an arbitrary URL,
and must not stall on one). A remote-only manifest is reported as not fetched.

Scoring, per the manifest store's validation state:

====================  ==============  ==========================
source type           valid/trusted   validation errors
====================  ==============  ==========================
AI (trained...)       0.99, w 3       0.90, w 1
digitalCapture        0.05, w 2.5     0.35, w 0.5
                      (trusted: 0.02, w 3)
anything else         0.5, w 0 (informational: signer and history only)
====================  ==============  ==========================

A manifest that fails validation was altered after signing, so what it claims
is weaker evidence either way. Without configured trust anchors every signer
is "untrusted"; that is reported, and only a trusted capture claim gets the
full weight, since anyone can sign a manifest saying "camera".
"""

from __future__ import annotations

import io
import json
import re
import threading
from typing import Any

import c2pa

from detectors.base import Detector, Evidence, EvidenceKind, register
from detectors.imagedata import ImageData
from detectors.plugins._source_types import classify, reported_codes, source_type_code

C2PA_SETTINGS: dict[str, Any] = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}

# Codes that only say the signer is not on a trust list; they do not mean the
# manifest or the image was tampered with.
_TRUST_ONLY_CODES = ("signingCredential.untrusted", "timeStamp.untrusted", "cawg.x509.credential.untrusted")
_URL = re.compile(r"https?://[^\s'\"]+")

# Every embedded manifest store is a JUMBF box labelled "c2pa"; a remote one
# is named by XMP's dcterms:provenance (in a PNG possibly inside a compressed
# XMP chunk, found by its keyword). Bytes with none of these carry no manifest
# c2pa could find, and scanning for them costs about a quarter of opening a
# Reader (measured ~80 vs ~300 us on a 100 kB JPEG): the common case, a
# picture without provenance, skips the Reader.
_MARKERS = (b"c2pa", b"provenance", b"XML:com.adobe.xmp")

_context: c2pa.Context | None = None
_context_lock = threading.Lock()


def offline_context() -> c2pa.Context:
    """One shared reader context with every network fetch disabled."""
    global _context
    with _context_lock:
        if _context is None:
            _context = c2pa.Context.from_dict(C2PA_SETTINGS)
        return _context


# Text from a manifest as reported: an unsigned (or invalid) manifest says
# anything, of any length, and the evidence travels in a broker message of at
# most 1 MB (a picture whose cluster op is larger is a dead letter, too_large).
MAX_NAME_CHARS = 200
MAX_LISTED = 20  # source types and validation codes listed in the evidence


def _name(value: Any) -> str | None:
    return None if value is None else str(value)[:MAX_NAME_CHARS]


def _agent_name(agent: Any) -> str | None:
    if isinstance(agent, dict):
        return _name(agent.get("name"))
    return _name(agent) if isinstance(agent, str) else None


def _actions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for assertion in manifest.get("assertions") or []:
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            data = assertion.get("data") or {}
            out += [a for a in data.get("actions") or [] if isinstance(a, dict)]
    return out


def _source_types(store: dict[str, Any], active: str | None) -> list[dict[str, Any]]:
    """Every action's digital source type across the store; ingredients'
    manifests count too (an AI ingredient makes the composite AI)."""
    found: list[dict[str, Any]] = []
    for label, manifest in (store.get("manifests") or {}).items():
        for action in _actions(manifest):
            code = source_type_code(str(action.get("digitalSourceType") or ""))
            if code is None:
                continue
            found.append(
                {
                    "code": code,
                    "kind": classify(code),
                    "action": action.get("action"),
                    "software_agent": _agent_name(action.get("softwareAgent")),
                    "in_active_manifest": label == active,
                }
            )
    return found


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info:
        parts = [f"{i.get('name')} {i.get('version', '')}".strip() for i in info[:MAX_LISTED] if isinstance(i, dict)]
        if parts:
            return _name(", ".join(parts))
    return _name(manifest.get("claim_generator"))


def assess_store(store: dict[str, Any]) -> Evidence:
    """Turn a c2pa-python manifest store (``Reader.json()``) into evidence."""
    active = store.get("active_manifest")
    manifest = (store.get("manifests") or {}).get(active or "", {})
    state = str(store.get("validation_state") or "Unknown")
    codes = [s.get("code", "") for s in store.get("validation_status") or [] if isinstance(s, dict)]
    errors = sorted({str(c)[:MAX_NAME_CHARS] for c in codes if c and c not in _TRUST_ONLY_CODES})[:MAX_LISTED]
    valid = state in ("Valid", "Trusted") and not errors
    trusted = state == "Trusted" and valid
    sig = manifest.get("signature_info") or {}
    signer = _name(sig.get("issuer") or sig.get("common_name"))
    generator = _claim_generator(manifest)
    sources = _source_types(store, active)
    kinds = {s["kind"] for s in sources}

    if valid:
        validation = "trusted signer" if trusted else "valid signature, signer not on a trust list"
    else:
        validation = f"INVALID ({', '.join(errors) or state})"
    facts = f"claim generator {generator or 'unknown'}; signed by {signer or 'unknown'}; {validation}"
    data = {
        "validation_state": state,
        "validation_errors": errors,
        "trusted": trusted,
        "signer": signer,
        "claim_generator": generator,
        "source_types": sorted(sources, key=lambda s: s["kind"] != "ai")[:MAX_LISTED],  # AI ones kept first
        "active_manifest": _name(active),
    }

    if "ai" in kinds:
        ai = next(s for s in sources if s["kind"] == "ai")
        where = "" if ai["in_active_manifest"] else " of an ingredient"
        agent = f" by {ai['software_agent']}" if ai["software_agent"] else ""
        detail = f"C2PA manifest{where} declares {ai['code']}{agent} (generative AI); {facts}"
        score, weight = (0.99, 3.0) if valid else (0.9, 1.0)
    elif kinds == {"capture"}:
        detail = f"C2PA manifest declares digitalCapture (camera original); {facts}"
        if trusted:
            score, weight = 0.02, 3.0
        elif valid:
            score, weight = 0.05, 2.5
        else:
            score, weight = 0.35, 0.5
    else:
        declared = ", ".join(reported_codes(s["code"] for s in sources)) or "no digital source type"
        detail = f"C2PA manifest present ({declared}); {facts}"
        score, weight = 0.5, 0.0
    return Evidence(detector=C2paDetector.name, kind=C2paDetector.kind, score=score, weight=weight, detail=detail, data=data)


def may_carry_manifest(data: bytes) -> bool:
    """False only when ``data`` cannot hold a C2PA manifest, embedded or remote."""
    return any(marker in data for marker in _MARKERS)


def _not_read(message: str) -> Evidence:
    """A manifest exists but could not be read offline: say so, weigh nothing."""
    remote = "remote" in message.lower()
    url_match = _URL.search(message)
    url = url_match.group(0).rstrip(".,)") if url_match else None
    if remote:
        detail = f"C2PA manifest is stored remotely at {url or 'an external URL'}; not fetched (remote fetching is off)"
        data: dict[str, Any] = {"remote_manifest": {"url": url, "fetched": False}}
    else:
        detail = f"C2PA data present but unreadable: {message[:200]}"
        data = {"error": message[:500]}
    return Evidence(detector=C2paDetector.name, kind=C2paDetector.kind, score=0.5, weight=0.0, detail=detail, data=data)


@register
class C2paDetector(Detector):
    name = "c2pa"
    kind = EvidenceKind.PROVENANCE
    cost = "cheap"

    def analyze(self, image: ImageData) -> list[Evidence]:
        if not may_carry_manifest(image.data):
            return []
        try:
            reader = c2pa.Reader.try_create(io.BytesIO(image.data), context=offline_context())
        except c2pa.C2paError.NotSupported:
            return []  # a format c2pa cannot carry a manifest in
        except c2pa.C2paError as e:
            return [_not_read(str(e))]
        if reader is None:
            return []
        try:
            with reader:
                store = json.loads(reader.json())
        except (c2pa.C2paError, ValueError) as e:
            return [_not_read(str(e))]
        return [assess_store(store)]
