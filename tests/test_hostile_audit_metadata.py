"""Malformed EXIF that made the generator-metadata detector raise: the
detector's other findings (an AI generator named in EXIF Software) went with
it, so one odd tag hid a picture's metadata from the analysis."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from detectors.imagedata import ImageData
from detectors.plugins.generator_metadata import GeneratorMetadataDetector

_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def _exif_jpeg(ifd0: list[tuple[int, int, int, bytes]], sub: list[tuple[int, int, int, bytes]]) -> bytes:
    """A JPEG whose EXIF holds ``ifd0`` and, in its Exif sub-IFD, ``sub``
    (each entry: tag, type, count, value; values over 4 bytes stored after)."""
    n0 = len(ifd0) + 1
    sub_at = 8 + 2 + 12 * n0 + 4
    extra_at = sub_at + 2 + 12 * len(sub) + 4
    extra = b""

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        nonlocal extra
        if len(value) > 4:
            value, extra = struct.pack(">I", extra_at + len(extra)), extra + value
        return struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\x00")

    ifd0 = sorted(ifd0 + [(_EXIF_IFD, 4, 1, struct.pack(">I", sub_at))])
    tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", n0) + b"".join(entry(*e) for e in ifd0) + b"\x00" * 4
    tiff += struct.pack(">H", len(sub)) + b"".join(entry(*e) for e in sub) + b"\x00" * 4 + extra
    app1 = b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\x00\x00" + tiff
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()[:2] + app1 + buf.getvalue()[2:]


SOFTWARE = (0x0131, 2, 11, b"Midjourney\x00")


@pytest.mark.parametrize("odd", [
    (_USER_COMMENT, 3, 1, struct.pack(">HH", 7, 0)),     # UserComment as a SHORT
    (_USER_COMMENT, 5, 1, struct.pack(">II", 1, 2)),     # ... as a RATIONAL
])
def test_a_user_comment_that_is_not_text_does_not_hide_the_other_findings(odd):
    found = GeneratorMetadataDetector().analyze(ImageData(_exif_jpeg([SOFTWARE], [odd])))
    assert [e.data["generators"] for e in found] == [["Midjourney"]]


def test_an_xp_comment_of_numbers_past_a_byte_does_not_hide_the_other_findings():
    xp_comment = (0x9C9C, 3, 2, struct.pack(">HH", 300, 400))  # SHORTs, which bytes() refused
    found = GeneratorMetadataDetector().analyze(ImageData(_exif_jpeg([SOFTWARE, xp_comment], [])))
    assert [e.data["generators"] for e in found] == [["Midjourney"]]


def test_a_well_formed_user_comment_is_still_read():
    text = b"ASCII\x00\x00\x00Steps: 20, Sampler: Euler a, Model: sdxl"
    comment = (_USER_COMMENT, 7, len(text), text)
    found = GeneratorMetadataDetector().analyze(ImageData(_exif_jpeg([], [comment])))
    assert found and found[0].data["findings"][0]["where"] == "EXIF UserComment"


# -- evidence that grew with the file past the broker's message size ---------------

def _op_or_dead(tmp_path, chunks: bytes):
    from streams.records import ClusterOp
    from tests.test_hostile_audit_decode import _picture, _png, _through_the_stage

    png = _png(_picture((300, 200)))
    r = _through_the_stage(tmp_path, png[:33] + chunks + png[33:])
    assert r.dead is None, (r.dead.stage, r.dead.reason, r.dead.detail[:200])
    return ClusterOp.loads(r.op).sighting


def _evidence(sighting, detector: str):
    [ev] = [e for e in sighting.evidence if e.detector == detector]
    return ev


def test_thousands_of_generator_chunks_leave_a_sighting_with_bounded_evidence(tmp_path):
    # Each chunk was a finding in the evidence and a place in its detail: 4,000
    # made the cluster op 1.07 MB, over the broker's 1 MB, and the picture a
    # dead letter (dedupe:too_large) instead of a sighting flagged as Midjourney.
    from tests.test_hostile_audit_decode import _chunk

    chunks = b"".join(_chunk(b"tEXt", b"k%05d" % i + b"x" * 70 + b"\x00Job ID: 12345678-1234-5678") for i in range(4000))
    ev = _evidence(_op_or_dead(tmp_path, chunks), "generator-metadata")
    assert ev.data["generators"] == ["Midjourney"] and ev.data["findings_total"] == 4000
    assert len(ev.data["findings"]) <= 20 and len(ev.detail) < 1000 and "3997 more places" in ev.detail


@pytest.mark.parametrize("key, value", [
    (b"invokeai_metadata", b'{"model": {"model_name": "' + b"A" * 1_000_000 + b'"}}'),
    (b"parameters", b'{"version": "Fooocus v2", "base_model": "' + b"C" * 1_000_000 + b'"}'),
])
def test_a_megabyte_model_name_leaves_a_sighting(tmp_path, key, value):
    # The model name went whole into the detail and the data: a 2 MB cluster op.
    import zlib

    from tests.test_hostile_audit_decode import _chunk

    ev = _evidence(_op_or_dead(tmp_path, _chunk(b"zTXt", key + b"\x00\x00" + zlib.compress(value))),
                   "generator-metadata")
    assert ev.score >= 0.99 and len(ev.data["findings"][0]["model"]) <= 200 and len(ev.detail) < 1000


def test_xmp_packets_of_countless_source_types_leave_a_sighting(tmp_path):
    # Every distinct code went into the data and the detail: two 1 MB packets of
    # long made-up codes made a 3.5 MB cluster op.
    from tests.test_hostile_audit_decode import _chunk

    def packet(k: str, ai: bool) -> bytes:
        items = "".join(f"<rdf:li>http://cv.iptc.org/newscodes/digitalsourcetype/{k}{i:06d}{'z' * 300}</rdf:li>"
                        for i in range(2800))
        if ai:
            items += "<rdf:li>http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia</rdf:li>"
        text = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
                f"<Iptc4xmpExt:DigitalSourceType><rdf:Bag>{items}</rdf:Bag></Iptc4xmpExt:DigitalSourceType>"
                "</rdf:Description></rdf:RDF></x:xmpmeta>")
        return _chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + text.encode())

    ev = _evidence(_op_or_dead(tmp_path, packet("a", False) + packet("b", True)), "xmp")
    assert ev.score == 0.97 and "trainedAlgorithmicMedia" in ev.detail  # the AI claim is still read
    assert len(ev.data["digital_source_types"]) <= 10 and len(ev.detail) < 1000
    assert all(len(c) <= 100 for c in ev.data["digital_source_types"])


def test_a_c2pa_store_of_countless_actions_gives_bounded_evidence():
    # An unsigned manifest says what it likes: every action's source type, and
    # names of any length, went into the evidence whole.
    from detectors.plugins.c2pa_manifest import assess_store

    base = "http://cv.iptc.org/newscodes/digitalsourcetype/"
    actions = [{"action": "c2pa.created", "digitalSourceType": f"{base}made{i}{'z' * 200}",
                "softwareAgent": {"name": "N" * 100_000}} for i in range(5000)]
    actions.append({"action": "c2pa.created", "digitalSourceType": base + "trainedAlgorithmicMedia"})
    store = {"active_manifest": "urn:" + "u" * 100_000, "validation_state": "Invalid",
             "validation_status": [{"code": f"bad.{i}" + "e" * 300} for i in range(5000)],
             "manifests": {"urn:" + "u" * 100_000: {"claim_generator": "G" * 1_000_000,
                                                    "signature_info": {"issuer": "I" * 1_000_000},
                                                    "assertions": [{"label": "c2pa.actions", "data": {"actions": actions}}]}}}
    ev = assess_store(store)
    assert "trainedAlgorithmicMedia" in ev.detail and ev.score == 0.9
    assert len(ev.model_dump_json()) < 40_000
    assert ev.data["source_types"][0]["code"] == "trainedAlgorithmicMedia"
