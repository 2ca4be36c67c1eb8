"""C2PA and XMP provenance detectors on the shared c2pa-python fixtures."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from detectors.base import Evidence
from detectors.imagedata import DecodeLimits, ImageData
from detectors.plugins.c2pa_manifest import C2PA_SETTINGS, C2paDetector, assess_store
from detectors.plugins.xmp import XmpDetector

IPTC = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


@pytest.fixture(scope="module")
def c2pa_dir(shared_data: Path) -> Path:
    return shared_data / "fixtures" / "c2pa-python" / "tests" / "fixtures"


def c2pa_evidence(path: Path) -> list[Evidence]:
    return C2paDetector().analyze(ImageData.from_path(path))


def test_signed_digital_capture_counts_against(c2pa_dir: Path) -> None:
    [ev] = c2pa_evidence(c2pa_dir / "C_with_CAWG_data.jpg")
    assert ev.score <= 0.1 and ev.weight >= 2.0
    assert "digitalCapture" in ev.detail and "C2PA Test Signing Cert" in ev.detail
    assert "c2pa cawg test" in ev.detail  # claim generator is reported
    assert ev.data["validation_state"] == "Valid" and ev.data["validation_errors"] == []


def test_algorithmic_media_is_not_ai(c2pa_dir: Path) -> None:
    [ev] = c2pa_evidence(c2pa_dir / "C.jpg")
    assert ev.data["source_types"][0]["code"] == "algorithmicMedia"
    assert ev.score == 0.5 and ev.weight == 0.0


def test_tampered_manifest_reports_validation_errors(c2pa_dir: Path) -> None:
    [ev] = c2pa_evidence(c2pa_dir / "files-for-reading-tests" / "XCA.jpg")
    assert "assertion.dataHash.mismatch" in ev.data["validation_errors"]
    assert "INVALID" in ev.detail


def test_no_manifest_gives_no_evidence(c2pa_dir: Path) -> None:
    assert c2pa_evidence(c2pa_dir / "A.jpg") == []


def test_marker_scan_skips_only_files_without_a_manifest(c2pa_dir: Path, monkeypatch) -> None:
    """The byte scan in front of the Reader changes no answer on any fixture
    (embedded, remote, tampered, none; JPEG, PNG, WebP, HEIF, AVIF, TIFF, DNG)
    and does skip the Reader for files without provenance."""
    import detectors.plugins.c2pa_manifest as mod

    files = [p for p in sorted(c2pa_dir.rglob("*")) if p.is_file() and p.suffix.lower() in
             {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".tif", ".dng", ".gif"}]
    assert len(files) >= 20
    # sample1.heif is a 51 MP camera original: its decode holds 385 MiB (463
    # counted), over the default budget, as an operator who analyses such
    # originals raises it.
    originals = DecodeLimits(max_decode_bytes=512 << 20)
    scanned = {p: C2paDetector().analyze(ImageData.from_path(p, originals)) for p in files}
    skipped = [p for p in files if not mod.may_carry_manifest(p.read_bytes())]
    monkeypatch.setattr(mod, "may_carry_manifest", lambda data: True)  # the Reader on every file
    read = {p: C2paDetector().analyze(ImageData.from_path(p, originals)) for p in files}
    # (the Reader's own output can differ between two reads of one file, e.g.
    # an ingredient's in_active_manifest: compare what was found, per file)
    assert {p: [e.detail for e in ev] for p, ev in scanned.items()} == {p: [e.detail for e in ev] for p, ev in read.items()}
    assert sum(1 for ev in read.values() if ev) >= 10  # the fixtures do hold manifests
    assert skipped and all(read[p] == [] for p in skipped)


def test_remote_manifest_is_never_fetched(c2pa_dir: Path) -> None:
    assert C2PA_SETTINGS["verify"]["remote_manifest_fetch"] is False
    start = time.monotonic()
    [ev] = c2pa_evidence(c2pa_dir / "cloud.jpg")
    assert time.monotonic() - start < 2.0  # a network attempt would stall or fail slowly
    assert ev.data["remote_manifest"]["fetched"] is False
    assert ev.data["remote_manifest"]["url"].startswith("https://cai-manifests.adobe.com/")
    assert ev.weight == 0.0 and "not fetched" in ev.detail


def _store(source_type: str, *, state: str = "Valid", errors: tuple[str, ...] = (), ingredient: bool = False) -> dict:
    action = {"action": "c2pa.created", "digitalSourceType": source_type, "softwareAgent": {"name": "GenTool 1.0"}}
    actions = {"label": "c2pa.actions.v2", "data": {"actions": [action]}}
    active = {"claim_generator_info": [{"name": "GenTool", "version": "1.0"}],
              "signature_info": {"issuer": "Example CA"}, "assertions": [] if ingredient else [actions]}
    manifests = {"urn:active": active}
    if ingredient:
        manifests["urn:ingredient"] = {"assertions": [actions]}
    status = [{"code": "signingCredential.untrusted"}] + [{"code": c} for c in errors]
    return {"active_manifest": "urn:active", "manifests": manifests, "validation_state": state, "validation_status": status}


def test_trained_algorithmic_media_is_decisive() -> None:
    ev = assess_store(_store(TRAINED))
    assert ev.score >= 0.99 and ev.weight >= 3.0
    assert "trainedAlgorithmicMedia" in ev.detail and "GenTool" in ev.detail and "Example CA" in ev.detail


def test_ai_ingredient_makes_composite_ai() -> None:
    ev = assess_store(_store(TRAINED.replace("trained", "compositeWithTrained"), ingredient=True))
    assert ev.score > 0.9 and "ingredient" in ev.detail


def test_validation_errors_weaken_the_claim() -> None:
    good = assess_store(_store(TRAINED))
    bad = assess_store(_store(TRAINED, state="Invalid", errors=("claimSignature.mismatch",)))
    assert bad.score > 0.5 and bad.weight < good.weight
    capture = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"
    assert assess_store(_store(capture, state="Invalid", errors=("assertion.dataHash.mismatch",))).weight < 1.0


def _jpeg_with_xmp(xmp: str) -> ImageData:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "gray").save(buf, "JPEG", xmp=xmp.encode())
    return ImageData(buf.getvalue())


def _xmp(prefix: str, uri: str, value: str) -> str:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:{prefix}="{uri}" {prefix}:DigitalSourceType="{value}"/>'
        "</rdf:RDF></x:xmpmeta>"
    )


def test_xmp_source_type_matched_by_namespace_not_prefix() -> None:
    [ev] = XmpDetector().analyze(_jpeg_with_xmp(_xmp("foo", IPTC, TRAINED)))
    assert ev.score > 0.9 and ev.weight >= 2.0 and "trainedAlgorithmicMedia" in ev.detail
    # The conventional prefix bound to some other URI is not the IPTC property.
    assert XmpDetector().analyze(_jpeg_with_xmp(_xmp("Iptc4xmpExt", "http://example.com/ns/", TRAINED))) == []


def test_xmp_non_ai_source_type_carries_no_weight() -> None:
    [ev] = XmpDetector().analyze(
        _jpeg_with_xmp(_xmp("Iptc4xmpExt", IPTC, "http://cv.iptc.org/newscodes/digitalsourcetype/algorithmicMedia"))
    )
    assert ev.weight == 0.0


def test_xmp_creator_tool_names_generator() -> None:
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/"><xmp:CreatorTool>Adobe Firefly</xmp:CreatorTool>'
           "</rdf:Description></rdf:RDF></x:xmpmeta>")
    [ev] = XmpDetector().analyze(_jpeg_with_xmp(xmp))
    assert ev.score > 0.9 and "Adobe Firefly" in ev.detail


def test_xmp_entity_expansion_is_refused() -> None:
    bomb = ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            + "".join(f'<!ENTITY a{i} "{"&a;" * 10 if i == 0 else f"&a{i - 1};" * 10}">' for i in range(9))
            + ']><x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:i="{IPTC}" i:DigitalSourceType="{TRAINED}&a8;"/></rdf:RDF></x:xmpmeta>')
    start = time.monotonic()
    assert XmpDetector().analyze(_jpeg_with_xmp(bomb)) == []
    assert time.monotonic() - start < 1.0


def test_real_photos_with_xmp_give_no_ai_evidence(shared_data: Path) -> None:
    photo = shared_data / "detect-dev" / "real" / "Canon EOS-1D Mark III (via Adobe Lightroom).jpg"
    assert all(ev.score <= 0.5 for ev in XmpDetector().analyze(ImageData.from_path(photo)))


def test_xmp_parser_refuses_any_dtd() -> None:
    from detectors.plugins._xmp import parse_packet

    assert parse_packet(b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>') is None
    assert parse_packet(b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>") is not None
