"""Find and safely parse XMP packets in untrusted image bytes.

XMP is matched by namespace URI after real XML parsing, never by prefix or
regex: ``Iptc4xmpExt:`` is only a conventional prefix and any other one may be
bound to the same URI. Parsing is defused by refusing any DTD, looked for in
the packet's decoded text (without a DTD there are no entity declarations,
so no entity expansion and no external entities) and by capping each
packet's size and depth and the elements parsed; every step after it is
linear in the packet (a 1 MB packet of nested properties once cost 2.9 GB
and 10 s, joining each one's descendants' text).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Iterable

from detectors.plugins._png_text import read_png_metadata

IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_NS = "http://ns.adobe.com/xap/1.0/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
ST_EVT_NS = "http://ns.adobe.com/xap/1.0/sType/ResourceEvent#"

MAX_PACKET_BYTES = 1 << 20
MAX_PACKETS = 8
# Real packets nest about 10 deep and hold a few hundred elements (tens of
# thousands for a bloated photoshop:DocumentAncestors list, near 1 MB).
MAX_DEPTH = 100
MAX_ELEMENTS = 50_000  # per packet, and for all the packets of one image together
MAX_VALUE_CHARS = 4096  # a URI or a tool name; longer is cut, never joined further
_FEED_BYTES = 1 << 16  # parsed in slices, so a refusal comes early

_WRAPPERS = ((b"<x:xmpmeta", b"</x:xmpmeta>"), (b"<rdf:RDF", b"</rdf:RDF>"))
_PNG_XMP_KEY = "XML:com.adobe.xmp"


def _scan(data: bytes, start_tag: bytes, end_tag: bytes) -> list[bytes]:
    """Packets ``start_tag``...``end_tag`` of at most ``MAX_PACKET_BYTES``.
    Each opener takes the first terminator after it, found without a bound:
    when that one is too far, every opener before it is too, so the search
    resumes where a packet could still end there. Without this, each of
    100,000 unterminated openers searched 1 MB (21 s for a 1 MB file)."""
    packets: list[bytes] = []
    pos = 0
    while len(packets) < MAX_PACKETS:
        start = data.find(start_tag, pos)
        if start < 0:
            break
        end = data.find(end_tag, start)
        if end < 0:  # no terminator anywhere after this opener, so none after a later one either
            break
        end += len(end_tag)
        if end - start > MAX_PACKET_BYTES:
            pos = max(start + len(start_tag), end - MAX_PACKET_BYTES)
            continue
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
    """Parse one packet; None for anything malformed, oversized, nested
    deeper than ``MAX_DEPTH``, holding more than ``MAX_ELEMENTS`` elements or
    carrying a DTD."""
    return _parse(packet, MAX_ELEMENTS)[0]


def parse_packets(packets: Iterable[bytes]) -> list[ET.Element]:
    """The packets that parse (see ``parse_packet``), with one budget of
    ``MAX_ELEMENTS`` for all of them: eight packets of tiny elements cost
    the Python side of the parser no more than one (about 0.1 s)."""
    roots: list[ET.Element] = []
    budget = MAX_ELEMENTS
    for packet in packets:
        if budget <= 0:
            break
        root, used = _parse(packet, budget)
        budget -= used
        if root is not None:
            roots.append(root)
    return roots


def _parse(packet: bytes, max_elements: int) -> tuple[ET.Element | None, int]:
    """(the packet's root or None, the elements it started). Parsed in
    slices, so a packet over a bound is refused where it crosses it."""
    if len(packet) > MAX_PACKET_BYTES:
        return None, 0
    text = _packet_text(packet)
    if text is None or "<!DOCTYPE" in text or "<!ENTITY" in text:
        return None, 0
    parser = ET.XMLPullParser(events=("start", "end"))
    root: ET.Element | None = None
    depth = elements = 0
    try:
        for i in range(0, len(text), _FEED_BYTES):
            # Text, not bytes: expat then parses UTF-8 whatever encoding the
            # packet declares, so the DTD check above saw what expat reads.
            parser.feed(text[i:i + _FEED_BYTES])
            for event, el in parser.read_events():
                if event == "end":
                    depth -= 1
                    continue
                depth += 1
                elements += 1
                if depth > MAX_DEPTH or elements > max_elements:
                    return None, elements
                if root is None:
                    root = el
        parser.close()
    except (ET.ParseError, ValueError):
        return None, elements
    return root, elements


# XMP may be serialised in UTF-16 or UTF-32 (XMP part 1, 7.3), always with a
# byte order mark; anything else must be UTF-8.
_BOMS = (("utf-32", (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")), ("utf-16", (b"\xff\xfe", b"\xfe\xff")),
         ("utf-8-sig", (b"\xef\xbb\xbf",)))


def _packet_text(packet: bytes) -> str | None:
    """The packet as text, or None when it is not valid in its encoding.

    Decoded here rather than by expat: a packet declaring
    ``encoding="UTF-16"`` (or a one-byte codec such as EBCDIC ``cp037``,
    which pyexpat accepts) spells ``<!DOCTYPE`` in other bytes, so a byte
    search let its DTD through and expat expanded its entities (a 960 KB
    packet grew to 48 million characters)."""
    codec = next((c for c, boms in _BOMS if packet.startswith(boms)), None)
    # without a mark, UTF-16/32 is told by how "<" comes out (XML 1.0, appendix F), as expat tells it
    codec = codec or next((c for c, head in _UNMARKED if packet.startswith(head)), None)
    if codec is None:
        try:
            return packet.decode("utf-8")
        except UnicodeDecodeError:
            pass
        # not UTF-8: the encoding the XML declaration names, which expat honoured before
        # (a Latin-1 packet with one accented name lost its digital source type with it)
        declared = _DECLARED.search(packet[:512])
        if declared is None:
            return None
        codec = declared.group(1).decode("ascii")
    try:
        return packet.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


_UNMARKED = (("utf-32-be", b"\x00\x00\x00<"), ("utf-32-le", b"<\x00\x00\x00"), ("utf-16-be", b"\x00<"),
             ("utf-16-le", b"<\x00"))
_DECLARED = re.compile(rb"""<\?xml\s[^>]{0,200}?encoding\s*=\s*["']([A-Za-z0-9._-]{1,40})["']""")


_LI = f"{{{RDF_NS}}}li"
_VALUE = f"{{{RDF_NS}}}value"
_CONTAINERS = frozenset(f"{{{RDF_NS}}}{c}" for c in ("Alt", "Bag", "Seq"))


def _element_values(el: ET.Element) -> list[str]:
    """A property element's values: its own text; else, spelled as an RDF
    array or language alternative, each ``rdf:li``'s text; else a qualified
    value's ``rdf:value``. Only the element's children and grandchildren are
    read, so each element is read once however the properties nest."""
    text = (el.text or "").strip()
    if text:
        return [text]
    values: list[str] = []
    for child in el:
        if child.tag in _CONTAINERS:
            values += [li.text or "" for li in child if li.tag == _LI]
        elif child.tag == _VALUE:
            values.append(child.text or "")
    return values


def property_values(roots: Iterable[ET.Element], namespace: str, name: str) -> list[str]:
    """Every value of property ``{namespace}name`` in its three RDF spellings:
    an attribute, an element's text (see ``_element_values``), or an
    element's ``rdf:resource``; stripped, each cut to ``MAX_VALUE_CHARS``."""
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
                values += _element_values(el)
    return [v.strip()[:MAX_VALUE_CHARS] for v in values if v and v.strip()]
