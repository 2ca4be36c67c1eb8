"""Safe decoding: every limit is enforced before pixels are decoded, and bad
input is refused with a reason code, never a crash."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from detectors.imagedata import DecodeLimits, ImageData, ImageRejected
from streams.demo_feed import bomb_png, jpeg_bytes, scene


def test_bomb_is_refused_from_the_header_without_decoding():
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as e:
        ImageData(bomb_png(100_000, 100_000))
    assert e.value.reason in ("decompression_bomb", "too_large")
    assert time.perf_counter() - started < 1.0  # 10 Gpx would take minutes and 30 GB to decode


def test_limits_are_configurable():
    data = jpeg_bytes(scene(1, (800, 600)))
    with pytest.raises(ImageRejected, match="pixels exceeds"):
        ImageData(data, limits=DecodeLimits(max_pixels=100_000))
    with pytest.raises(ImageRejected, match="max dimension"):
        ImageData(data, limits=DecodeLimits(max_dimension=500))
    with pytest.raises(ImageRejected) as e:
        ImageData(data, limits=DecodeLimits(max_bytes=100))
    assert e.value.reason == "too_large"


def test_truncated_and_garbage_input_are_rejected_with_reasons():
    full = jpeg_bytes(scene(2))
    with pytest.raises(ImageRejected) as e:
        ImageData(full[: len(full) // 3]).rgb
    assert e.value.reason == "undecodable"
    with pytest.raises(ImageRejected) as e:
        ImageData(b"<html>not an image</html>")
    assert e.value.reason == "undecodable"
    with pytest.raises(ImageRejected) as e:
        ImageData(b"")
    assert e.value.reason == "empty"


def test_exif_orientation_is_applied():
    img = scene(3, (300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert ImageData(buf.getvalue()).rgb.size == (200, 300)


def test_draft_thumbnail_is_small_but_not_below_the_floor():
    im = ImageData(jpeg_bytes(scene(4, (2048, 1536))))
    thumb = im.thumbnail(128)
    assert min(thumb.size) >= 128 and max(thumb.size) <= 512


def test_phone_heic_decodes(shared_data):
    heic = next(shared_data.rglob("*.HEIC"), None)
    if heic is None:
        pytest.skip("no HEIC sample in shared data")
    im = ImageData.from_path(heic)
    assert im.format == "HEIF" and min(im.rgb.size) > 1000


def _jpeg(size: tuple[int, int], **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(buf, "JPEG", quality=20, **save)
    return buf.getvalue()


def test_progressive_jpeg_counts_its_coefficient_buffer():
    # libjpeg holds every DCT coefficient of a progressive file (2 bytes each,
    # at full size whatever the output scale): a 1.5 MB 16384x6100 CMYK file
    # held 800 MB while the budget, decoding it at 1/2 scale, counted 100.
    limits = DecodeLimits(max_decode_bytes=20 << 20)
    with pytest.raises(ImageRejected) as e:  # 36 MB of coefficients; the 1/2-scale output alone would fit
        ImageData(_jpeg((4000, 3000), progressive=True), limits=limits)
    assert e.value.reason == "memory_budget" and "DCT coefficients" in str(e.value)
    baseline = ImageData(_jpeg((4000, 3000)), limits=limits)  # single scan: decoded reduced, as before
    assert baseline.decode_cost <= 20 << 20 and baseline.rgb.size[0] <= 2000
    small = ImageData(_jpeg((400, 300), progressive=True))
    assert small.decode_cost >= 400 * 300 * (3 + 3)  # output + 4:2:0 coefficients, in the budget's reservation


def _saved(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def test_the_decode_budget_counts_what_a_decode_holds():
    # It counted 3 bytes a pixel whatever the file: a 2.5 KB lossless WebP of
    # 8000x8000 passed a 200 MiB budget at 183 MiB and took the process to
    # 1,029 MB (libwebp's canvas and frame copy, Pillow's 4-byte RGB); a grey
    # PNG of that size held 309 MB, its RGB copy included.
    rgb, grey = Image.new("RGB", (1000, 1000), (30, 100, 200)), Image.new("L", (1000, 1000), 77)
    big = DecodeLimits(max_decode_bytes=1 << 30)
    assert ImageData(_saved(rgb, "PNG"), limits=big).decode_cost == 1000 * 1000 * 4
    assert ImageData(_saved(grey, "PNG"), limits=big).decode_cost == 1000 * 1000 * (1 + 4)
    assert ImageData(_saved(rgb, "WEBP", lossless=True), limits=big).decode_cost == 1000 * 1000 * (4 + 12)
    with pytest.raises(ImageRejected) as e:  # counted at 3 MB before
        ImageData(_saved(rgb, "WEBP", lossless=True), limits=DecodeLimits(max_decode_bytes=10 << 20))
    assert e.value.reason == "memory_budget"


_DECODE_PEAK = """
import sys
from detectors.imagedata import DecodeLimits, ImageData
def kib(field):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))
image = ImageData(open(sys.argv[1], 'rb').read(), limits=DecodeLimits(max_decode_bytes=1 << 30))
open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) starts again from here
before = kib('VmRSS:')
image.rgb
print(image.decode_cost, (kib('VmHWM:') - before) << 10)
"""


@pytest.mark.parametrize("fmt, save, per_pixel", [
    ("HEIF", {}, 1.5 + 4 + 4),  # 8-bit 4:2:0 planes, interleaved RGBA, Pillow's RGB
    ("HEIF", {"chroma": 444}, 3 + 4 + 4),
    ("AVIF", {}, 2 * 1.5 + 4 + 4),  # the AV1 decoder's frame and libavif's planes
    ("AVIF", {"subsampling": "4:4:4"}, 2 * 3 + 4 + 4),
])
def test_heif_and_avif_count_their_decoders_buffers(tmp_path, fmt, save, per_pixel):
    # Counted at Pillow's 4 bytes a pixel, these decodes held 7.8-15.8 (16 MP
    # files): libheif and libavif hold YCbCr planes and an interleaved copy at
    # the coded depth while Pillow's pixels are filled, so a budget of 320 MiB
    # let through pictures that held 2-4 times that. Measured in a process of
    # its own, so the peak is this decode's.
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (250, 250, 3), dtype=np.uint8)).resize((2000, 2000))
    path = tmp_path / f"picture.{fmt.lower()}"
    noise.save(path, fmt, quality=60, **save)
    run = subprocess.run([sys.executable, "-c", _DECODE_PEAK, str(path)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    counted, grew = map(int, run.stdout.split())
    assert counted == int(2000 * 2000 * per_pixel)
    # never under what the decode holds (a decoder's fixed state, its
    # threads' stacks and context, is not per pixel: 4 MiB of room) ...
    assert grew <= counted + (4 << 20)
    assert counted <= 2 * grew  # ... nor so far over that honest pictures are refused


def test_an_avif_whose_depth_cannot_be_read_counts_the_deepest():
    from detectors.imagedata import codec_buffer_bytes

    header = Image.new("RGB", (100, 100))
    header.format = "AVIF"  # what Pillow's plugin sets; no av1C box in these bytes
    assert codec_buffer_bytes(b"\x00" * 64, header) == 100 * 100 * (2 * 2 * 3 + 4 * 2)


def test_multi_scan_jpeg_is_recognised_from_its_first_scan():
    from detectors.imagedata import _jpeg_multi_scan

    baseline = _jpeg((64, 48))
    assert not _jpeg_multi_scan(baseline)
    assert _jpeg_multi_scan(_jpeg((64, 48), progressive=True))
    sos = baseline.index(b"\xff\xda")
    one_component = baseline[: sos + 4] + b"\x01" + baseline[sos + 5:]  # a non-interleaved first scan
    assert _jpeg_multi_scan(one_component)
    assert _jpeg_multi_scan(b"\xff\xd8\x00garbage")  # unreadable: counted as the costlier kind


def test_decoded_views_share_one_full_size_decode():
    # A PNG has no reduced decode: the hashing thumbnail was a second full
    # decode held next to ``rgb``, each made through two more full-size
    # copies (EXIF transpose, same-mode convert) -- 6x the budgeted bytes.
    buf = io.BytesIO()
    scene(5, (600, 400)).save(buf, "PNG")
    image = ImageData(buf.getvalue())
    assert image.thumbnail(128) is image.rgb


def test_decoded_pixels_do_not_keep_the_decoder_alive():
    # WebP's decoder keeps its canvas and the frame it returned (2x the image)
    # for as long as the file object lives: the pixels are handed out without it.
    from PIL import ImageFile

    buf = io.BytesIO()
    scene(6, (300, 200)).save(buf, "WEBP")
    image = ImageData(buf.getvalue())
    assert not isinstance(image.rgb, ImageFile.ImageFile)
    assert not isinstance(image.pixels("RGB", oriented=False), ImageFile.ImageFile)


def test_exif_rotation_of_a_png_is_applied_in_place():
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    scene(7, (300, 200)).save(buf, "PNG", exif=exif.tobytes())
    image = ImageData(buf.getvalue())
    assert image.rgb.size == (200, 300) and image.pixels(oriented=False).size == (300, 200)


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc")
def test_memory_of_a_large_decode_is_given_back_after_analysis(tmp_path):
    # Freed pixel buffers stayed in the decoding thread's malloc arena: a
    # pipeline worker peaked at 1.8 GB after three pictures under the budget.
    import threading

    from streams.analyze import Analyzer
    from streams.records import SourceRef
    from streams.settings import Settings
    from tests.hostile.corpus import rgba_png_bomb

    analyzer = Analyzer(Settings(data_dir=tmp_path), tmp_path / "blobs")
    event = __import__("streams.records", fromlist=["ImageEvent"]).ImageEvent.model_validate(
        {"event_id": "big", "platform": "x", "account_id": "a", "posted_at": "2026-01-01T00:00:00Z",
         "image": {"url": "https://example.com/a.png"}})
    before = _rss_mib()
    for i in range(3):  # each in its own thread, as the pipeline's to_thread pool does
        data = rgba_png_bomb(3000 + i, 3000)  # ~36 MB of RGBA each, different bytes
        t = threading.Thread(target=analyzer.analyze, args=(event, data, SourceRef(topic="t", partition=0, offset=i)))
        t.start()
        t.join()
    grown = _rss_mib() - before
    assert grown < 80, f"worker kept {grown} MiB after its analyses ended"


def test_cheap_detectors_add_no_full_size_copy_of_a_large_picture(tmp_path):
    # Outside the decode budget, each was one more copy of the picture: Pillow's
    # PNG getexif() (read for the orientation) decoded every pixel again, and
    # the watermark and stealth-metadata detectors turned the whole picture into
    # an array to read a band or a few columns. A 6000x6000 RGB PNG (103 MiB
    # decoded) grew the process by about 350 MiB more; a band's work is left.
    from tests.support import GRADIENT_PNG, decoded_then_grown_mib

    grown = decoded_then_grown_mib(tmp_path, GRADIENT_PNG.format(side=6000),
                                   "for d in create_all(cost='cheap'):\n    d.analyze(image)",
                                   imports="from detectors.base import create_all")
    assert grown < 150, grown  # MiB


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    import struct
    import zlib
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


@pytest.mark.parametrize("where", ["before the pixels", "after the pixels"])
def test_an_oversized_text_chunk_does_not_hide_the_pixels_wherever_it_sits(where):
    # Pillow reads text chunks after IDAT in load(), not open(): a 2 KB zTXt
    # inflating to 2 MB there made the whole picture undecodable.
    import zlib
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(buf, "PNG")
    png = buf.getvalue()
    ztxt = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b" " * (2 << 20), 9))
    at = 33 if where == "before the pixels" else png.rfind(b"IEND") - 4
    image = ImageData(png[:at] + ztxt + png[at:])
    assert image.rgb.size == (64, 64)
    assert image.rgb.tobytes() == Image.open(io.BytesIO(png)).convert("RGB").tobytes()
    assert image.notes == [f"zTXt chunk of {len(ztxt) - 12} bytes decompresses beyond 1048576 bytes; skipped"]


def test_sixteen_bit_and_float_pixels_are_scaled_not_clipped():
    # Pillow's convert clips wide samples to 8 bits: a 16-bit PNG at half grey
    # decoded white, a float TIFF in 0-1 black; hashes then matched nothing.
    import numpy as np
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))
    cases = {"PNG": Image.fromarray((ramp * 65535).astype(np.uint16)),
             "TIFF": Image.fromarray(ramp.astype(np.float32))}
    for fmt, img in cases.items():
        buf = io.BytesIO()
        img.save(buf, fmt)
        grey = np.asarray(ImageData(buf.getvalue()).pixels("L"), dtype=float)
        assert np.abs(grey - ramp * 255).max() <= 1.5, (fmt, img.mode, grey[0, ::16])
    eight_bit = Image.fromarray((np.ones((64, 64)) * 100).astype(np.int32))  # mode I holding 8-bit values
    buf = io.BytesIO()
    eight_bit.save(buf, "TIFF")
    assert np.asarray(ImageData(buf.getvalue()).rgb).mean() == 100


def test_a_thumbnails_cost_is_the_reduced_decode_for_a_jpeg_and_the_full_one_otherwise():
    # the desk reserved a 6000x4000 JPEG's full 91 MiB of the shared decode budget for a 750x500 decode
    import io

    from PIL import Image

    from detectors.imagedata import ImageData

    def encoded(fmt: str) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (6000, 4000), (10, 20, 30)).save(out, fmt)
        return out.getvalue()

    jpeg = ImageData(encoded("JPEG"))
    assert jpeg.thumbnail_cost(256) == jpeg.decode_cost // 64  # draft mode's 1/8
    assert jpeg.thumbnail_cost(1024) == jpeg.decode_cost // 4  # 4000 // 1024 = 3: draft scales by powers of 2
    assert min(jpeg.thumbnail(256).size) >= 256
    png = ImageData(encoded("PNG"))
    assert png.thumbnail_cost(256) == png.decode_cost  # no reduced decode exists
