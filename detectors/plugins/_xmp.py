"""Find and safely parse XMP packets in untrusted image bytes.

XMP is matched by namespace URI after real XML parsing, never by prefix or
regex: ``Iptc4xmpExt:`` is only a conventional prefix and any other one may be
bound to the same URI. Parsing is defused by refusing any DTD (without a DTD
there are no entity declarations, so no entity expansion and no external
entities) and by capping each packet's size.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Iterable

from detectors.plugins._png_text import read_png_metadata

IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_NS = "http://ns.adobe.com/xap/1.0/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
ST_EVT_NS = "http://ns.adobe.com/xap/1.0/sType/ResourceEvent#"

MAX_PACKET_BYTES = 1 << 20
MAX_PACKETS = 8

_WRAPPERS = ((b"<x:xmpmeta", b"</x:xmpmeta>"), (b"<rdf:RDF", b"</rdf:RDF>"))
_PNG_XMP_KEY = "XML:com.adobe.xmp"


def _scan(data: bytes, start_tag: bytes, end_tag: bytes) -> list[bytes]:
    packets: list[bytes] = []
    pos = 0
    while len(packets) < MAX_PACKETS:
        start = data.find(start_tag, pos)
        if start < 0:
            break
        end = data.find(end_tag, start, start + MAX_PACKET_BYTES)
        if end < 0:
            pos = start + len(start_tag)
            continue
        end += len(end_tag)
        packets.append(data[start:end])
        pos = end
    return packets


def find_xmp_packets(data: bytes) -> list[bytes]:
    """Uncompressed packets anywhere in the file (JPEG APP1, WebP, TIFF, HEIF,
    PNG iTXt, ...) plus compressed PNG iTXt ones; de-duplicated, bounded."""
    packets: list[bytes] = []
    for start_tag, end_tag in _WRAPPERS:
        packets = _scan(data, start_tag, end_tag)
        if packets:
            break
    if data.startswith(b"\x89PNG"):
        texts, _ = read_png_metadata(data)
        packets += [t.value.encode("utf-8") for t in texts if t.key == _PNG_XMP_KEY and not t.truncated]
    seen: set[bytes] = set()
    unique = []
    for p in packets:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique[:MAX_PACKETS]


def parse_packet(packet: bytes) -> ET.Element | None:
    """Parse one packet; None for anything malformed, oversized or carrying a DTD."""
    if len(packet) > MAX_PACKET_BYTES or b"<!DOCTYPE" in packet or b"<!ENTITY" in packet:
        return None
    try:
        return ET.fromstring(packet)
    except (ET.ParseError, ValueError):
        return None


def property_values(roots: Iterable[ET.Element], namespace: str, name: str) -> list[str]:
    """Every value of property ``{namespace}name`` in its three RDF spellings:
    an attribute, an element's text, or an element's ``rdf:resource``."""
    qname = f"{{{namespace}}}{name}"
    resource = f"{{{RDF_NS}}}resource"
    values: list[str] = []
    for root in roots:
        for el in root.iter():
            if qname in el.attrib:
                values.append(el.attrib[qname])
            if el.tag == qname:
                if resource in el.attrib:
                    values.append(el.attrib[resource])
                text = "".join(el.itertext()).strip()
                if text:
                    values.append(text)
    return [v.strip() for v in values if v and v.strip()]
