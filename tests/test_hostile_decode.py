"""Hostile files that once blew up decoding or the CLI: nested or
unterminated XMP, JPEGs of thousands of scans, container formats that decode
inside ``Image.open``, and paths that are not regular files. Each input is
small; what is checked is the growth (characters produced, scans counted,
seconds spent) that made the full-size file cost gigabytes or minutes."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from detectors.imagedata import (
    MAX_JPEG_SCANS,
    DecodeLimits,
    ImageData,
    ImageRejected,
    ignore_pillow_warnings,
    jpeg_multi_scan,
    jpeg_scan_count,
)
from detectors.plugins import _xmp
from detectors.plugins.xmp import XmpDetector
from detectors.regular_file import FileRefused, read_regular
from tests.hostile.corpus import gif_canvas_bomb

ROOT = Path(__file__).resolve().parents[1]
IPTC = _xmp.IPTC_EXT_NS
RDF = _xmp.RDF_NS
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def _png(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, "PNG")
    return buf.getvalue()


def _jpeg(size: tuple[int, int] = (64, 64), **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buf, "JPEG", **save)
    return buf.getvalue()


def _within(seconds: float, fn: Callable[[], object]) -> object:
    """``fn()``'s result, failing (not hanging the suite) if it takes longer."""
    out: dict[str, object] = {}

    def go() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds}s (blocked?)"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]


# -- XMP ------------------------------------------------------------------

def _nested_packet(levels: int, text: str = "x" * 40) -> bytes:
    head = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF}">'
            f'<rdf:Description xmlns:a="{IPTC}">')
    body = ("<a:DigitalSourceType>" + text) * levels + "</a:DigitalSourceType>" * levels
    return (head + body + "</rdf:Description></rdf:RDF></x:xmpmeta>").encode()


def test_nested_properties_yield_text_linear_in_the_packet() -> None:
    # Each nested match used to join all its descendants' text: 2,000 levels
    # of 40 characters made 80 million characters (a 1 MB packet: 2.9 GB).
    packet = _nested_packet(2000)
    root = ET.fromstring(packet)  # past parse_packet's depth cap on purpose
    values = _xmp.property_values([root], IPTC, "DigitalSourceType")
    assert sum(map(len, values)) <= len(packet)
    assert values[0] == "x" * 40


def test_a_packet_nested_past_the_depth_cap_is_refused_early() -> None:
    packet = _nested_packet(11_000)  # ~0.9 MB, under the size cap (the audit's file: 2.9 GB, 10 s)
    assert len(packet) <= _xmp.MAX_PACKET_BYTES
    start = time.perf_counter()
    assert _xmp.parse_packet(packet) is None
    assert XmpDetector().analyze(ImageData(_png() + packet)) == []
    assert time.perf_counter() - start < 1.0


def test_packets_share_one_element_budget() -> None:
    head = f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF}">'
    wide = (head + "<b/>" * (_xmp.MAX_ELEMENTS // 2) + "</rdf:RDF></x:xmpmeta>").encode()
    assert _xmp.parse_packet(wide) is not None
    assert len(_xmp.parse_packets([wide] * 4)) == 1  # the second one crosses the budget; the rest are not parsed


def test_usual_rdf_spellings_of_a_value_are_still_read() -> None:
    packet = (
        f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="{RDF}">'
        f'<rdf:Description xmlns:xmp="{_xmp.XMP_NS}" xmlns:i="{IPTC}" i:DigitalSourceType="{TRAINED}">'
        "<xmp:CreatorTool><rdf:Alt><rdf:li xml:lang='x-default'>Adobe Firefly</rdf:li></rdf:Alt></xmp:CreatorTool>"
        f"<i:DigitalSourceType rdf:resource='{TRAINED}#r'/>"
        "<i:DigitalSourceType>  text  </i:DigitalSourceType>"
        "<i:DigitalSourceType rdf:parseType='Resource'><rdf:value>qualified</rdf:value></i:DigitalSourceType>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
    root = _xmp.parse_packet(packet)
    assert root is not None
    assert _xmp.property_values([root], IPTC, "DigitalSourceType") == [TRAINED, f"{TRAINED}#r", "text", "qualified"]
    assert _xmp.property_values([root], _xmp.XMP_NS, "CreatorTool") == ["Adobe Firefly"]


def test_unterminated_openers_are_scanned_in_linear_time() -> None:
    # Each opener searched up to 1 MB for a terminator: 30,000 openers took
    # about 2 s (100,000 in 1 MB: 21 s, on the event loop).
    data = _png() + b"<x:xmpmeta" * 30_000
    start = time.perf_counter()
    assert _xmp.find_xmp_packets(data) == []
    assert time.perf_counter() - start < 0.2


def test_a_packet_after_an_oversized_one_is_still_found() -> None:
    big = b"<x:xmpmeta>" + b" " * (_xmp.MAX_PACKET_BYTES + 10) + b"</x:xmpmeta>"
    good = b"<x:xmpmeta>ok</x:xmpmeta>"
    assert _xmp.find_xmp_packets(_png() + big + b"junk" + good) == [good]
    assert _xmp.find_xmp_packets(_png() + good + big) == [good]


# -- JPEG scans -----------------------------------------------------------

def _jpeg_with_scans(extra: int) -> bytes:
    """A progressive JPEG plus ``extra`` tiny AC scans, each an end-of-band
    run over every block: libjpeg walks the whole image once per scan."""
    base = _jpeg(progressive=True)
    dht = b"\xff\xc4" + (2 + 1 + 16 + 1).to_bytes(2, "big") + b"\x11" + bytes([1] + [0] * 15) + b"\xe0"
    sos = b"\xff\xda\x00\x08\x01\x01\x01\x3f\x3f\x00"  # component 1, AC table 1, Ss=Se=63
    return base[:-2] + dht + (sos + b"\x7f\xff\x00\xbf\xff\x00") * extra + b"\xff\xd9"


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding() -> None:
    data = _jpeg_with_scans(5000)
    start = time.perf_counter()
    with pytest.raises(ImageRejected) as e:
        ImageData(data)
    assert e.value.reason == "too_many_scans"
    assert time.perf_counter() - start < 0.5


def test_real_jpegs_are_counted_right_and_accepted() -> None:
    progressive = _jpeg(progressive=True)
    assert jpeg_scan_count(progressive)[0] == 10  # libjpeg's default script for YCbCr
    assert jpeg_scan_count(_jpeg())[0] == 1
    assert ImageData(_jpeg_with_scans(MAX_JPEG_SCANS - 10)).format == "JPEG"
    # An EXIF thumbnail's scans are the payload of a segment, never counted.
    exif = Image.Exif()
    exif[0x010F] = "camera"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "JPEG", exif=exif.tobytes() + _jpeg((32, 32), progressive=True))
    assert jpeg_scan_count(buf.getvalue())[0] == 1


def test_the_scan_bound_is_a_setting_for_the_rare_real_file_past_it() -> None:
    from streams.settings import Settings

    data = _jpeg_with_scans(MAX_JPEG_SCANS + 50)
    with pytest.raises(ImageRejected) as e:
        ImageData(data, limits=Settings().decode_limits())
    assert e.value.reason == "too_many_scans" and "decode.max_jpeg_scans" in str(e.value)
    raised = Settings(decode={"max_jpeg_scans": MAX_JPEG_SCANS + 100}).decode_limits()
    assert ImageData(data, limits=raised).format == "JPEG"


def test_a_jpeg_of_countless_marker_segments_is_refused() -> None:
    base = _jpeg()
    data = base[:2] + b"\xff\xfe\x00\x02" * 20_000 + base[2:]
    with pytest.raises(ImageRejected) as e:
        ImageData(data)
    assert e.value.reason == "too_many_segments"


def test_multi_scan_jpegs_are_told_from_their_bytes() -> None:
    assert jpeg_multi_scan(_jpeg(progressive=True))
    assert not jpeg_multi_scan(_jpeg())
    assert not jpeg_multi_scan(_png())


# -- formats and Pillow's warnings ----------------------------------------

def _ico(inner: bytes) -> bytes:
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 22) + inner


def test_formats_outside_the_accepted_ones_are_refused_before_decoding() -> None:
    # Pillow's ICO plugin decodes the embedded PNG inside Image.open (a
    # 12000x12000 one: 660 MB before any limit looked at it).
    with pytest.raises(ImageRejected) as e:
        ImageData(_ico(_png((64, 64))))
    assert e.value.reason == "undecodable" and "accepted: JPEG" in str(e.value)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PPM")
    with pytest.raises(ImageRejected):
        ImageData(buf.getvalue())


def test_pillow_bomb_warning_is_not_raised_our_limits_decide() -> None:
    bomb = gif_canvas_bomb()  # 96 MP: over Pillow's warning threshold, under our default pixel cap
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ignore_pillow_warnings()  # as every program that decodes does at start
        image = ImageData(bomb, limits=DecodeLimits(max_decode_bytes=1 << 30))
        with pytest.raises(ImageRejected) as e:
            ImageData(bomb, limits=DecodeLimits(max_pixels=50_000_000))
    assert image.size == (12_000, 8_000) and e.value.reason == "decompression_bomb"
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_warnings_stay_off_once_ignored_whatever_another_thread_restores() -> None:
    # ``catch_warnings`` swaps one process-wide filter list: an analyze thread
    # leaving its block restores the list another thread's block relied on,
    # and that thread's bomb warning reached the worker's log (CI). Leaving
    # the blocks in any order cannot undo the process-wide filter.
    bomb = gif_canvas_bomb()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ignore_pillow_warnings()
        first, second = warnings.catch_warnings(), warnings.catch_warnings()
        first.__enter__()
        warnings.simplefilter("ignore")
        second.__enter__()  # saves the first block's "ignore"
        first.__exit__(None, None, None)  # the first thread done: its saved list is back
        Image.open(io.BytesIO(bomb))  # the second thread, still in its block, reads a bomb
        second.__exit__(None, None, None)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_decode_in_one_thread_does_not_hold_up_another_images(monkeypatch) -> None:
    # Python 3.11's functools.cached_property locks per class: the event loop's
    # inline decode of a small picture waited for a thread decoding a large one
    slow, quick = ImageData(_png((64, 64))), ImageData(_png())
    started, release = threading.Event(), threading.Event()
    real = ImageData._decode

    def decode(self, img, *args, **kwargs):
        if self is slow:
            started.set()
            release.wait(20)
        return real(self, img, *args, **kwargs)

    monkeypatch.setattr(ImageData, "_decode", decode)
    held = threading.Thread(target=lambda: slow.rgb)
    held.start()
    try:
        assert started.wait(10)
        sizes: list[tuple[int, int]] = []
        other = threading.Thread(target=lambda: sizes.append(quick.rgb.size), daemon=True)
        other.start()
        other.join(5)
        assert sizes == [(16, 16)], "the second image waited for the first one's decode"
    finally:
        release.set()
        held.join(10)
    assert slow.rgb.size == (64, 64)


# -- paths that are not regular files -------------------------------------

def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(FileRefused) as e:
        _within(10, lambda: ImageData.from_path(fifo))
    assert e.value.reason == "not_a_file" and "FIFO" in str(e.value)


def test_devices_directories_and_sockets_are_refused_unread(tmp_path: Path) -> None:
    with pytest.raises(FileRefused, match="a device") as e:
        ImageData.from_path("/dev/zero")
    assert e.value.reason == "not_a_file"
    with pytest.raises(FileRefused, match="a directory"):
        ImageData.from_path(tmp_path)
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # AF_UNIX paths are short
        path = os.path.join(short, "s.jpg")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            with pytest.raises(FileRefused, match="a socket") as e:
                read_regular(path, 1024)
    assert e.value.reason == "not_a_file"
    with pytest.raises(FileRefused) as e:
        read_regular(tmp_path / "missing.jpg", 1024)
    assert e.value.reason == "not_found"


# -- the CLI --------------------------------------------------------------

def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


def test_cli_names_a_fifo_in_one_line_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    data = tmp_path / "data"
    assert "FIFO" in _one_error_line(_cli("detect", "--no-models", str(fifo), timeout=30))
    assert "FIFO" in _one_error_line(_cli("bank", "add", "b", "--verdict", "fake", str(fifo),
                                          "--data-dir", str(data), timeout=30))
    assert "FIFO" in _one_error_line(_cli("bank", "import", "b", str(fifo), "--data-dir", str(data), timeout=30))
    assert "FIFO" in _one_error_line(_cli("similar", str(fifo), "--data-dir", str(data), timeout=30))


def test_cli_refuses_a_data_dir_that_is_a_device(tmp_path: Path) -> None:
    picture = tmp_path / "a.png"
    picture.write_bytes(_png())
    assert "/dev/null" in _one_error_line(_cli("detect", "--no-models", "--data-dir", "/dev/null", str(picture)))


def test_cli_reports_a_truncated_image_as_an_error(tmp_path: Path) -> None:
    # replay dead-letters it (decode:undecodable); detect said "no-evidence", exit 0
    whole = _jpeg((300, 200), quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    r = _cli("detect", "--no-models", "--format", "json", str(truncated))
    assert r.returncode == 1, r.stderr
    [result] = json.loads(r.stdout)
    assert result["error"]["reason"] == "undecodable" and "truncated" in result["error"]["message"]
    assert result["verdict"] is None and result["format"] == "JPEG" and result["sha256"]
    assert "Warning" not in r.stderr and "Traceback" not in r.stderr
