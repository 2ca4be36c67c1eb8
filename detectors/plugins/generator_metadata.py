"""Generator metadata: the text AI front-ends write into the files they save.

Looks at PNG text chunks (before *and* after IDAT), EXIF (UserComment,
Software, ImageDescription, Make/Model, XPComment) in JPEG/WebP/PNG/TIFF, and
JPEG/GIF comments. What each tool's format looks like lives in
``_sd_formats``; this module only gathers the text, bounded, and weighs what
was found:

* a generator's own structured chunk (A1111 ``parameters``, ComfyUI graph,
  InvokeAI, NovelAI, Fooocus, Midjourney job id): 0.99, weight 3 (decisive:
  cameras and photo editors do not write these);
* a generator named in a tool field (EXIF Software, ...): 0.95, weight 2;
* a generator named in a human-written field (description, comment): 0.9,
  weight 1.5.

Absence of metadata is not evidence: almost every platform strips it.
"""

from __future__ import annotations

from typing import Any, Iterator

from PIL import Image

from detectors.base import Detector, Evidence, EvidenceKind, register
from detectors.imagedata import ImageData
from detectors.plugins._png_text import MAX_VALUE_BYTES, read_png_metadata
from detectors.plugins._sd_formats import Finding, recognise

_SCORES = {"generator-chunk": (0.99, 3.0), "tool-name": (0.95, 2.0), "free-text": (0.9, 1.5)}
_RANK = {"generator-chunk": 0, "tool-name": 1, "free-text": 2}

_IFD0_TAGS = {0x010E: "ImageDescription", 0x010F: "Make", 0x0110: "Model", 0x0131: "Software", 0x013B: "Artist"}
_XP_COMMENT = 0x9C9C
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_COMFY_EXIF_PREFIXES = ("prompt:", "workflow:")  # ComfyUI's WebP/AVIF saver


def decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: 8-byte charset id, then text. A1111 writes
    ``UNICODE`` + UTF-16 (big-endian via piexif; some tools little-endian)."""
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        # Guess byte order from where the zero high bytes of ASCII text sit.
        evens = body[0:2000:2].count(0)
        odds = body[1:2000:2].count(0)
        return body.decode("utf-16-be" if evens >= odds else "utf-16-le", errors="replace")
    if head.startswith(b"ASCII") or head == b"\x00" * 8:
        return body.decode("latin-1").rstrip("\x00 ")
    return raw.decode("utf-8", errors="replace").rstrip("\x00 ")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value[:MAX_VALUE_BYTES].decode("utf-8", errors="replace").rstrip("\x00")
    if isinstance(value, tuple):  # XP* tags can come back as tuples of byte values
        return _utf16(value)
    return str(value)[:MAX_VALUE_BYTES]


def _utf16(value: tuple | bytes) -> str:
    """An XP* tag's UTF-16 text; "" for a tuple that is not of byte values (a
    tag written as SHORTs or RATIONALs made ``bytes()`` raise, and the whole
    detector's findings went with it)."""
    try:
        return bytes(value[:MAX_VALUE_BYTES]).decode("utf-16-le", errors="replace").rstrip("\x00")
    except (TypeError, ValueError):
        return ""


def _exif_items(exif: Image.Exif) -> Iterator[tuple[str, str, str]]:
    for tag, key in _IFD0_TAGS.items():
        if tag in exif:
            value = _text(exif[tag]).strip()
            for prefix in _COMFY_EXIF_PREFIXES:
                if value.startswith(prefix):
                    key, value = prefix[:-1], value[len(prefix) :]
            yield key, value, f"EXIF {_IFD0_TAGS[tag]}"
    if _XP_COMMENT in exif:
        raw = exif[_XP_COMMENT]
        text = _utf16(raw) if isinstance(raw, (bytes, tuple)) else str(raw)
        yield "XPComment", text.rstrip("\x00")[:MAX_VALUE_BYTES], "EXIF XPComment"
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # malformed IFD pointers are common in the wild
        sub = {}
    raw = sub.get(_USER_COMMENT)
    # Text or bytes only: a UserComment written as a number (SHORT, RATIONAL)
    # raised on slicing, and the whole detector's findings went with it (an
    # EXIF Software "Midjourney" beside one was not reported).
    if isinstance(raw, (bytes, str)):
        yield "UserComment", decode_user_comment(raw[:MAX_VALUE_BYTES]), "EXIF UserComment"


def _load_exif(raw: bytes) -> Image.Exif | None:
    exif = Image.Exif()
    try:
        exif.load(raw)
    except Exception:  # corrupt EXIF must not hide the rest of the metadata
        return None
    return exif


def text_items(image: ImageData) -> Iterator[tuple[str, str, str]]:
    """(key, value, where) for every metadata text we look at, size-capped."""
    if image.format == "PNG":
        texts, exif_raw = read_png_metadata(image.data)
        for t in texts:
            yield t.key, t.value, f"PNG '{t.key}' {t.chunk} chunk"
        exif = _load_exif(exif_raw) if exif_raw else None
        if exif is not None:
            yield from _exif_items(exif)
        return
    img = image.header
    comment = img.info.get("comment")
    if comment:
        yield "comment", _text(comment), f"{image.format} comment"
    try:
        exif = img.getexif()
    except Exception:
        return
    yield from _exif_items(exif)


# Findings reported whole in the evidence, and places named per generator in
# its detail: a file can hold thousands (4,096 text chunks each carrying a
# Midjourney job id), and 4,000 made the picture's cluster op 1.07 MB, over
# the broker's 1 MB: the picture was a dead letter (too_large), not a sighting.
MAX_FINDINGS = 20
MAX_WHERES = 3


def _summarise(findings: list[Finding]) -> str:
    by_gen: dict[str, list[Finding]] = {}
    for f in findings:
        by_gen.setdefault(f.generator, []).append(f)
    parts = []
    for gen, fs in by_gen.items():
        places = list(dict.fromkeys(f.where for f in fs))
        wheres = " and ".join(places[:MAX_WHERES]) + (
            f" (and {len(places) - MAX_WHERES} more places)" if len(places) > MAX_WHERES else "")
        verb = "metadata in" if fs[0].strength == "generator-chunk" else "named in"
        model = next((f.model for f in fs if f.model), None)
        parts.append(f"{gen} {verb} {wheres}" + (f"; model {model}" if model else ""))
    return "; ".join(parts)


@register
class GeneratorMetadataDetector(Detector):
    name = "generator-metadata"
    kind = EvidenceKind.METADATA
    cost = "cheap"

    def analyze(self, image: ImageData) -> list[Evidence]:
        findings = [f for f in (recognise(k, v, w) for k, v, w in text_items(image)) if f is not None]
        if not findings:
            return []
        findings.sort(key=lambda f: _RANK[f.strength])
        score, weight = _SCORES[findings[0].strength]
        data = {
            "findings": [
                {"generator": f.generator, "where": f.where, "kind": f.strength, "model": f.model, **f.facts}
                for f in findings[:MAX_FINDINGS]  # the strongest first
            ],
            "generators": sorted({f.generator for f in findings}),
        }
        if len(findings) > MAX_FINDINGS:
            data["findings_total"] = len(findings)
        return [Evidence(detector=self.name, kind=self.kind, score=score, weight=weight, detail=_summarise(findings), data=data)]
