"""Stage 1: turn raw bytes from the events topic into a typed ``ImageEvent``.

Every way a line can be hostile ends here as ``InvalidEvent`` with a reason:
too large, not JSON (including nesting deeper than ``MAX_DEPTH``, numbers
with thousands of digits and lone UTF-16 surrogates), an unknown
``schema_version``, or a schema violation (a value of the wrong JSON type
included: ``true`` or ``"5"`` for a count is refused, not converted). Nothing
else escapes.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from streams.records import Engagement, ImageEvent, usable_event_id


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str, event_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.event_id = event_id


# Below Kafka's default max.message.bytes (1 MB), which is also what ingest
# accepts: an event with an inline image that passes this fits on the topic.
MAX_EVENT_BYTES = 1_000_000
MAX_DEPTH = 32  # a real event is 3 deep; nesting is only ever an attack on parsers


def _depth_ok(raw: bytes) -> bool:
    """Bracket nesting of a JSON text, counted without recursion (the stdlib
    parser recurses and raises RecursionError deep down)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return True  # the common case, at C speed
    depth = 0
    in_str = escaped = False
    for b in raw:
        if in_str:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def _encodable(doc: Any) -> bool:
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
        return True
    except (UnicodeEncodeError, ValueError, RecursionError):
        return False


def load_json(raw: bytes) -> Any:
    """``json.loads`` that only ever raises ``InvalidEvent``."""
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"event is {len(raw)} bytes, limit {MAX_EVENT_BYTES}")
    if bytes(raw[:1]) in (b"[", b"{") and not _depth_ok(bytes(raw)):
        raise InvalidEvent("malformed_json", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, >4300-digit ints
        raise InvalidEvent("malformed_json", f"not valid JSON: {str(e)[:200]}") from None
    if not _encodable(doc):
        raise InvalidEvent("malformed_json", "string with a lone UTF-16 surrogate (not valid Unicode)",
                           usable_event_id(doc.get("event_id")) if isinstance(doc, dict) else None)
    return doc


def event_id_of(raw: bytes) -> str | None:
    """The event id of a raw line if it has a usable one; never raises."""
    try:
        doc = load_json(raw)
    except InvalidEvent:
        return None
    return usable_event_id(doc.get("event_id")) if isinstance(doc, dict) else None


def json_kind(value: Any) -> str:
    """The JSON type of a parsed value, as an error message names it."""
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _wrong_json_types(doc: dict[str, Any]) -> list[str]:
    """Values of a JSON type the published schema refuses but pydantic's lax
    mode would convert: a boolean or a string for a count (``true`` became 1
    like, ``"5"`` five), a number for ``posted_at`` (taken as seconds since
    1970; a string of digits, ``"1700000000"``, is refused by ``ImageEvent``
    itself, which takes only ISO 8601 date-time strings). A producer that
    validates against the schema and this worker must agree on what is an
    event."""
    problems = []
    engagement = doc.get("engagement")
    if isinstance(engagement, dict):
        for key in Engagement.model_fields:
            value = engagement.get(key, 0)
            # JSON Schema's integer includes 5.0 (pydantic takes it too); a
            # fraction or a number out of range is left to pydantic to name.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"engagement.{key}: must be an integer, got {json_kind(value)}")
    if "posted_at" in doc and not isinstance(doc["posted_at"], str):
        problems.append(f"posted_at: must be a date-time string, got {json_kind(doc['posted_at'])}")
    return problems


def parse_event(raw: bytes) -> ImageEvent:
    doc = load_json(raw)
    if not isinstance(doc, dict):
        raise InvalidEvent("malformed_json", f"event must be a JSON object, got {type(doc).__name__}")
    event_id = usable_event_id(doc.get("event_id"))
    version = doc.get("schema_version", 1)
    if isinstance(version, bool) or version != 1:  # true == 1 in Python; the schema says the integer 1
        raise InvalidEvent("unsupported_version", f"schema_version {str(version)[:40]!r} is not supported (this worker knows 1)", event_id)
    wrong = _wrong_json_types(doc)
    if wrong:
        raise InvalidEvent("schema_violation", "; ".join(wrong[:5]), event_id)
    try:
        return ImageEvent.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise InvalidEvent("schema_violation", problems, event_id) from None
