"""Stage 1: turn raw bytes from the events topic into a typed ``ImageEvent``."""

from __future__ import annotations

import json

from pydantic import ValidationError

from streams.records import ImageEvent


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str, event_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.event_id = event_id


MAX_EVENT_BYTES = 4 * 1024 * 1024  # inline base64 images are capped separately, at decode


def parse_event(raw: bytes) -> ImageEvent:
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"event is {len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidEvent("malformed_json", f"not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidEvent("malformed_json", f"event must be a JSON object, got {type(doc).__name__}")
    event_id = doc.get("event_id") if isinstance(doc.get("event_id"), str) else None
    version = doc.get("schema_version", 1)
    if version != 1:
        raise InvalidEvent("unsupported_version", f"schema_version {version!r} is not supported (this worker knows 1)", event_id)
    try:
        return ImageEvent.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise InvalidEvent("schema_violation", problems, event_id) from None
