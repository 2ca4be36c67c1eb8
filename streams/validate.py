"""Stage 1: turn raw bytes from the events topic into a typed ``ImageEvent``.

Every way a line can be hostile ends here as ``InvalidEvent`` with a reason:
too large (in bytes, or in JSON values: ``MAX_JSON_VALUES``), not JSON
(including nesting deeper than ``MAX_DEPTH``, integers of more than
``MAX_INT_DIGITS`` digits and lone UTF-16 surrogates), an unknown
``schema_version``, or a schema violation (a value of the wrong JSON type
included: ``true`` or ``"5"`` for a count is refused, not converted). Nothing
else escapes.

What validating one event costs is bounded: the worker validates on its
event loop (``serve-ingest`` in a thread, a request's lines one after the other).
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
# Parsing, the surrogate check (_encodable) and pydantic cost per JSON value,
# not per byte: one 0.96 MB event of 320,000 empty arrays in a field that is
# ignored ("x": [[],[],...]) took 107 ms to validate on a dev machine (187 ms
# in the audit), on the event loop, and an 8 MB ingest request of eight such
# lines ~0.9 s (1.46 s). The values are counted from the '[', '{' and ','
# outside strings (bytes.count, C speed) and an event with too many is
# refused before it is parsed, as too_large (that one now in 6 ms). A real
# event has a few hundred values at most (64 hashtags is the longest list the
# schema has); the limit leaves room for fields deepwatch does not know yet
# (an embedding of 3,072 numbers fits). Validating an event at the limit costs
# at most ~9 ms (5,000 floats such as 1.2345678901234567e-300, the dearest
# value measured), about what a 1 MB string costs anyway; at 10,000 it was
# twice that, and one token's 50 events/s could take a whole core.
MAX_JSON_VALUES = 5_000
# Integers are converted (and converted back, by _encodable) in quadratic
# time: 220 integers of 4,299 digits, just under CPython's 4,300-digit limit
# and only 220 values, took 76 ms. A count has at most 16 digits (2^53), a
# 256-bit number 78.
MAX_INT_DIGITS = 100

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _outside_strings(raw: bytes) -> bytes | None:
    """The bytes of a JSON text outside its strings, each string cut to a 0,
    at C speed; None when it has so many strings that it must have over
    ``MAX_JSON_VALUES`` values."""
    # Pairs of backslashes, then escaped quotes: what is left of the quotes
    # delimits the strings (a backslash outside a string is not JSON anyway).
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Each value, and each key, may be a string: a text with v values has at
    # most 2v + 1 strings. Beyond that no need to split (1 MB of quotes took 40 ms).
    if plain.count(b'"') > 4 * MAX_JSON_VALUES + 2:
        return None
    return b"0".join(plain.split(b'"')[0::2])  # not b"": [""] is not an empty array


def _as_utf8(raw: bytes) -> bytes:
    """``raw`` in UTF-8, which the counts below read byte by byte: json.loads
    also takes UTF-16 and UTF-32, where a CJK character may hold a '"' or ','."""
    encoding = json.detect_encoding(raw)
    if encoding in ("utf-8", "utf-8-sig"):
        return raw
    try:
        return raw.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    except UnicodeError:
        return raw  # json.loads refuses it


def _too_many_values(raw: bytes) -> InvalidEvent | None:
    """Refusal of a text with over ``MAX_JSON_VALUES`` values, before it is parsed."""
    if raw.count(b"[") + raw.count(b"{") + raw.count(b",") <= MAX_JSON_VALUES:
        return None  # the common case, at C speed (never fewer than the values)
    outside = _outside_strings(raw)  # those in strings (a text full of commas) are no values
    if outside is None:
        return InvalidEvent("too_large", f"event has over {MAX_JSON_VALUES} JSON values (it has over "
                                         f"{2 * MAX_JSON_VALUES + 1} strings), limit {MAX_JSON_VALUES}")
    # A container of n items has n - 1 commas, an empty one none: the items
    # are the commas and the openers, less the empty containers.
    tight = outside.translate(None, b" \t\r\n")
    values = (tight.count(b"[") + tight.count(b"{") + tight.count(b",")
              - tight.count(b"[]") - tight.count(b"{}"))
    if values <= MAX_JSON_VALUES:
        return None
    return InvalidEvent("too_large", f"event has {values} JSON values (array items and object members), "
                                     f"limit {MAX_JSON_VALUES}")


def _depth_ok(raw: bytes) -> bool:
    """Bracket nesting of a JSON text, counted without recursion (the stdlib
    parser recurses and raises RecursionError deep down). Called once the text
    has at most ``MAX_JSON_VALUES`` values: the loop runs over its brackets
    outside strings only (it ran over every byte: 38 ms for 1 MB)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return True  # the common case, at C speed
    outside = _outside_strings(raw)
    if outside is None:
        return True  # more strings than its values allow: not JSON, json.loads says so
    depth = 0
    for b in outside.translate(None, _NOT_BRACKETS):
        if b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        else:
            depth -= 1
            if depth < 0:
                return True  # a closer with no opener: not JSON, json.loads says so
    return True


class _LongInteger(ValueError):
    pass


def _parse_int(digits: str) -> int:
    if len(digits) - digits.startswith("-") > MAX_INT_DIGITS:
        raise _LongInteger(len(digits) - digits.startswith("-"))
    return int(digits)


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
    text = _as_utf8(bytes(raw))
    too_many = _too_many_values(text)
    if too_many is not None:
        raise too_many
    if bytes(raw[:1]) in (b"[", b"{") and not _depth_ok(text):
        raise InvalidEvent("malformed_json", f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(raw, parse_int=_parse_int)
    except _LongInteger as e:
        raise InvalidEvent("malformed_json", f"an integer of {e.args[0]} digits, limit {MAX_INT_DIGITS}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
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
