"""Hostile pictures found by the decode audit: each broke the rule (one clear
outcome, bounded time and memory) before its fix. Every file is made here,
small; what is checked is the refusal before Pillow starts (whose work grew
with the file), the pixels still analysed where only metadata was hostile,
or the memory a decode holds."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detectors.imagedata import (
    MAX_GIF_STEPS,
    MAX_PNG_CHUNKS,
    MAX_RLE_BMP_PIXELS,
    DecodeLimits,
    ImageData,
    ImageRejected,
)
from detectors.plugins import _xmp
from tests.support import GRADIENT_PNG, decoded_then_grown_mib


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body) & 0xFFFFFFFF)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _picture(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    return Image.frombytes("RGB", size, bytes(range(256)) * (size[0] * size[1] * 3 // 256 + 1)).convert(mode)


def _gif(extra: bytes) -> bytes:
    """A 16x12 GIF with ``extra`` between its header and its first picture."""
    buf = io.BytesIO()
    _picture((16, 12), "P").save(buf, "GIF")
    gif = buf.getvalue()
    flags = gif[10]
    at = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # after the global colour table
    return gif[:at] + extra + gif[at:]


def _refused(data: bytes) -> ImageRejected:
    started = time.perf_counter()
    with pytest.raises(ImageRejected) as e:
        ImageData(data)
    assert time.perf_counter() - started < 1.0
    return e.value


# -- structure Pillow walks in Python ------------------------------------------

def test_a_gif_padded_with_comment_sub_blocks_is_refused_before_pillow_holds_them():
    # Pillow keeps each comment sub-block as a bytes object while it opens the
    # file: 24 MB of 1-byte ones held 1.1 GB (and 9 s) for a 10x10 picture whose
    # decode the budget counted as nothing. Here 140 KB, refused unopened.
    comment = b"\x21\xfe" + b"\x01a" * (MAX_GIF_STEPS + 10) + b"\x00"
    assert _refused(_gif(comment)).reason == "too_many_segments"
    # Many empty extensions, or stray bytes Pillow skips one at a time, alike.
    assert _refused(_gif(b"\x21\xfe\x00" * (MAX_GIF_STEPS + 10))).reason == "too_many_segments"
    assert _refused(_gif(b"\x00" * (MAX_GIF_STEPS + 10))).reason == "too_many_segments"


def test_real_gifs_with_comments_xmp_and_frames_still_open():
    xmp = b"\x21\xff\x0bXMP DataXMP" + b"<x:xmpmeta>" + bytes(range(255, 0, -1)) * 40 + b"\x00"
    comment = b"\x21\xfe" + (b"\xff" + b"c" * 255) * 400 + b"\x00"  # a 100 KB comment
    image = ImageData(_gif(xmp + comment))
    assert image.rgb.size == (16, 12)
    buf = io.BytesIO()
    frames = [_picture((32, 32), "P").rotate(i) for i in range(300)]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert ImageData(buf.getvalue()).rgb.size == (32, 32)


def test_a_png_of_countless_chunks_is_refused_before_pillow_reads_them():
    # Pillow reads every chunk in Python on each open, and keeps private ones:
    # 1.5 million empty chunks (18 MB) cost 14 s and 590 MB for a 300x300 picture.
    png = _png(_picture())
    padded = png[:33] + _chunk(b"abCd", b"") * (MAX_PNG_CHUNKS + 10) + png[33:]
    assert _refused(padded).reason == "too_many_segments"


def test_a_png_written_one_idat_per_row_still_decodes():
    img = _picture((40, 2000))
    raw = b"".join(b"\x00" + img.tobytes()[y * 120:(y + 1) * 120] for y in range(2000))
    comp = zlib.compressobj()
    idats = b"".join(_chunk(b"IDAT", comp.compress(raw[y * 121:(y + 1) * 121]) + comp.flush(zlib.Z_SYNC_FLUSH))
                     for y in range(2000))
    png = _png(img)
    data = png[:33] + idats + _chunk(b"IDAT", comp.flush()) + _chunk(b"IEND", b"")
    assert ImageData(data).rgb.tobytes() == img.tobytes()


def _bmp(width: int, height: int, body: bytes, compression: int, bpp: int) -> bytes:
    palette = b"\x00\x00\x00\x00" * (1 << bpp)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bpp, compression, len(body), 2835, 2835, 0, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def test_an_rle_bmp_over_its_pixel_bound_is_refused_from_the_header():
    # Pillow's RLE decoder is Python: 17 KB of end-of-line codes in a 16384x4096
    # RLE8 file took 7.3 s of one core (holding the GIL) a decode.
    eol = _bmp(16384, 4096, b"\x01\x05\x00\x00" * 4096 + b"\x00\x01", compression=1, bpp=8)
    e = _refused(eol)
    assert e.reason == "too_large" and "RLE" in str(e)
    runs = _bmp(4096, -4096, (b"\xff\x12" * 16 + b"\x00\x00") * 4096 + b"\x00\x01", compression=2, bpp=4)
    assert 4096 * 4096 > MAX_RLE_BMP_PIXELS and _refused(runs).reason == "too_large"


def test_a_small_rle_bmp_still_decodes():
    body = (b"\x40\x07" + b"\x00\x00") * 64 + b"\x00\x01"  # 64 rows of 64 pixels of colour 7
    image = ImageData(_bmp(64, 64, body, compression=1, bpp=8))
    assert image.format == "BMP" and image.rgb.size == (64, 64)


# -- MPO: a JPEG under another name ---------------------------------------------

def _mpo(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))], **save)
    return buf.getvalue()


def _jpeg(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def test_a_progressive_mpo_counts_its_dct_coefficients_as_a_jpeg_does():
    # Pillow opens a JPEG with an MPF segment as "MPO": compared with "JPEG"
    # alone, a progressive one's coefficient buffer went uncounted (a 700 KB
    # 12000x5000 file passed at 228 MiB and peaked at 631 MiB).
    img = Image.linear_gradient("L").resize((1200, 500)).convert("RGB")
    mpo = ImageData(_mpo(img, progressive=True, subsampling=0))
    jpeg = ImageData(_jpeg(img, progressive=True, subsampling=0))
    assert mpo.format == "MPO"
    assert mpo.decode_cost == jpeg.decode_cost > 1200 * 500 * 4
    limits = DecodeLimits(max_decode_bytes=jpeg._coefficients)  # not even a 1/8 scale decode fits beside them
    with pytest.raises(ImageRejected) as e:
        ImageData(_mpo(img, progressive=True, subsampling=0), limits=limits)
    assert e.value.reason == "memory_budget" and "DCT coefficients" in str(e.value)


def test_an_mpo_over_the_budget_is_decoded_reduced_and_hashed_from_a_draft():
    img = Image.linear_gradient("L").resize((1600, 1200)).convert("RGB")
    limits = DecodeLimits(max_decode_bytes=1600 * 1200 * 4 // 3)
    image = ImageData(_mpo(img, quality=70), limits=limits)
    assert image.format == "MPO" and image.notes and "1/2 scale" in image.notes[0]
    assert image.rgb.size == (800, 600)
    assert max(ImageData(_mpo(img, quality=70)).thumbnail(128).size) <= 400  # DCT-scaled, not a full decode


# -- metadata Pillow refuses the whole picture for ------------------------------

def test_a_png_with_an_oversized_icc_profile_is_still_analysed():
    # Pillow refuses the whole file for an iCCP inflating past 1 MB; browsers show
    # the picture. A 2 KB profile chunk let a picture escape analysis.
    png = _png(_picture())
    iccp = _chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * (2 << 20), 9))
    image = ImageData(png[:33] + iccp + png[33:])
    assert image.rgb.tobytes() == _picture().tobytes()
    assert image.notes and "iCCP" in image.notes[0]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_png_with_a_short_transparency_chunk_is_still_analysed(mode: str):
    png = _png(_picture(mode=mode))
    at = png.index(b"IDAT") - 4
    image = ImageData(png[:at] + _chunk(b"tRNS", b"\x00") + png[at:])
    assert image.rgb.tobytes() == _picture(mode=mode).convert("RGB").tobytes()
    assert image.notes and "tRNS" in image.notes[0]


# -- XMP spelled in another encoding ----------------------------------------------

def _laughs(levels: int) -> str:
    entities = "".join(f'<!ENTITY e{k + 1} "' + f"&e{k};" * 10 + '">' for k in range(levels))
    return ('<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY e0 "' + "A" * 1000 + '">' + entities
            + f']><x:xmpmeta xmlns:x="adobe:ns:meta/" xmlns:xmp="{_xmp.XMP_NS}"><xmp:CreatorTool>&e{levels};'
            "</xmp:CreatorTool></x:xmpmeta>")


def test_an_xmp_packet_in_utf16_cannot_slip_a_dtd_past_the_check():
    # The DTD check searched the bytes for "<!DOCTYPE": in UTF-16 it is other
    # bytes, and expat expanded the entities (a 960 KB packet grew 48 million
    # characters).
    packet = _laughs(2).encode("utf-16")
    assert b"<!DOCTYPE" not in packet
    assert _xmp.parse_packet(packet) is None
    ebcdic = b'<?xml version="1.0" encoding="cp037"?>' + _laughs(2).split("?>", 1)[1].encode("cp037")
    assert _xmp.parse_packet(ebcdic) is None


@pytest.mark.parametrize("codec", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_xmp_packets_in_each_allowed_encoding_are_still_read(codec: str):
    text = (f'<?xml version="1.0" encoding="{codec.upper().removesuffix("-SIG")}"?><x:xmpmeta '
            f'xmlns:x="adobe:ns:meta/" xmlns:xmp="{_xmp.XMP_NS}"><xmp:CreatorTool>Midjourney é</xmp:CreatorTool>'
            "</x:xmpmeta>")
    root = _xmp.parse_packet(text.encode(codec))
    assert root is not None and _xmp.property_values([root], _xmp.XMP_NS, "CreatorTool") == ["Midjourney é"]


def test_xmp_in_a_declared_one_byte_encoding_or_unmarked_utf16_is_still_read():
    # decoded as UTF-8 alone, a Latin-1 packet with one accented creator lost its AI source type with it,
    # which expat had read by the declaration
    body = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/" xmlns:xmp="{_xmp.XMP_NS}">'
            "<xmp:CreatorTool>Midjourney \u00e9</xmp:CreatorTool></x:xmpmeta>")
    latin = ('<?xml version="1.0" encoding="ISO-8859-1"?>' + body).encode("latin-1")
    root = _xmp.parse_packet(latin)
    assert root is not None and _xmp.property_values([root], _xmp.XMP_NS, "CreatorTool") == ["Midjourney \u00e9"]
    for codec in ("utf-16-le", "utf-16-be"):  # no byte order mark: told by how "<" is spelt, as expat does
        root = _xmp.parse_packet(('<?xml version="1.0"?>' + body).encode(codec))
        assert root is not None, codec
        assert _xmp.parse_packet(_laughs(2).replace(' encoding="UTF-16"', "").encode(codec)) is None, codec


# -- the pixel model's re-post ---------------------------------------------------

def test_the_pixel_models_repost_adds_no_full_size_copy(tmp_path: Path):
    # The re-post (``canonical``) copied the full-size decode to shrink it: one
    # more picture outside the decode budget (an 8800x8800 PNG counted at 295 MiB
    # peaked at 762 MiB in the detect role, 466 MiB without the copy). Here a
    # 5000x5000 RGB decode (95 MiB held) adds a 1600 px re-post and its JPEG.
    grown = decoded_then_grown_mib(tmp_path, GRADIENT_PNG.format(side=5000),
                                   "assert canonical(image).size == (1600, 1600)",
                                   imports="from detectors.models.pixel_data import canonical")
    assert grown < 60, grown  # MiB; a copy alone is 95


def test_the_repost_leaves_its_source_and_encodes_as_before():
    from detectors.models.dataset import REPOST_QUALITY, repost_rgb

    img = _picture((2000, 1500))
    before = img.tobytes()
    copy = img.copy()
    copy.thumbnail((1600, 1600), Image.BICUBIC)
    buf = io.BytesIO()
    copy.save(buf, "JPEG", quality=REPOST_QUALITY, subsampling="4:2:0")
    assert repost_rgb(img) == buf.getvalue()
    assert img.size == (2000, 1500) and img.tobytes() == before
    assert np.asarray(Image.open(io.BytesIO(repost_rgb(_picture((300, 200)))))).shape == (200, 300, 3)


# -- EXIF: an orientation beside a malformed tag ----------------------------------

def _exif_jpeg(img: Image.Image, entries: list[tuple[int, int, int, bytes]]) -> bytes:
    tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", len(entries))
    tiff += b"".join(struct.pack(">HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    tiff += b"\x00\x00\x00\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\x00\x00" + tiff
    jpeg = _jpeg(img, quality=95)
    return jpeg[:2] + app1 + jpeg[2:]


@pytest.mark.parametrize("bad_tag", [
    (0x010E, 5, 1, struct.pack(">I", 26)),  # ImageDescription as a RATIONAL (Pillow cannot write it back)
    (0x0131, 11, 1, b"\x00\x00\x00\x00"),   # Software as a FLOAT
])
def test_a_malformed_exif_tag_beside_an_orientation_does_not_hide_the_picture(bad_tag):
    # Pillow's exif_transpose writes the EXIF block back without its orientation,
    # and the write raised for a tag that reading had let through: the picture,
    # shown upright by browsers, was refused as undecodable.
    img = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    orientation = (0x0112, 3, 1, struct.pack(">HH", 6, 0))  # rotate 90 degrees clockwise on display
    image = ImageData(_exif_jpeg(img, sorted([orientation, bad_tag])))
    assert image.orientation == 6
    assert image.rgb.size == (48, 64)  # upright, as with a well-formed block
    well_formed = ImageData(_exif_jpeg(img, [orientation]))
    assert image.rgb.tobytes() == well_formed.rgb.tobytes()
    assert image.pixels(oriented=False).size == (64, 48)
    # ... and training and evaluation (the re-post every training row is made of) turn it as inference does
    from detectors.models.dataset import repost_bytes

    reposted = Image.open(io.BytesIO(repost_bytes(_exif_jpeg(img, sorted([orientation, bad_tag])))))
    assert reposted.size == (48, 64)


# -- more structure Pillow walks in Python ----------------------------------------

def _photoshop_app13(blocks: int) -> bytes:
    body = b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00\x00\x00\x00\x00" * blocks
    return b"\xff\xed" + struct.pack(">H", len(body) + 2) + body


def test_a_jpeg_of_countless_photoshop_resource_blocks_is_refused_before_pillow_parses_them():
    # Pillow's header parse reads each 8BIM block in Python: 2 million 12-byte
    # ones (24 MB) cost 2.7 s an open, 8 s an analysis, for a 300x300 picture.
    from detectors.imagedata import MAX_PHOTOSHOP_BLOCKS

    jpeg = _jpeg(_picture())
    segments = _photoshop_app13(5000) * (MAX_PHOTOSHOP_BLOCKS // 5000 + 1)
    assert _refused(jpeg[:2] + segments + jpeg[2:]).reason == "too_many_segments"
    # A real Photoshop segment (IPTC, resolution, a thumbnail) is read as before.
    real = ImageData(jpeg[:2] + _photoshop_app13(40) + jpeg[2:])
    assert real.rgb.size == (64, 48) and 0x0404 in real.header.info["photoshop"]


def _tiled_tiff(side: int, tile: int) -> bytes:
    """A ``side`` square grey TIFF of ``tile``-px uncompressed tiles, every one
    pointing at the same bytes."""
    n = (side // tile) ** 2
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (277, 3, 1, 1),
               (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, 0), (325, 4, n, 0)]
    arrays = 8 + 2 + 12 * len(entries) + 4
    data = arrays + 8 * n
    entries[-2] = (324, 4, n, arrays)
    entries[-1] = (325, 4, n, arrays + 4 * n)
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, count, value in entries) + b"\x00\x00\x00\x00"
    return (b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", data) * n + struct.pack("<I", tile * tile) * n
            + bytes(range(256)) * (tile * tile // 256))


def test_a_tiff_of_countless_tiles_is_refused_before_pillow_lists_them():
    # Pillow lists and decodes each uncompressed tile in Python: 262,144 16-px
    # tiles of an 8192x8192 file (2 MB) cost 1.3 s an open and 4 s a decode.
    from detectors.imagedata import MAX_TIFF_BLOCKS

    assert (8192 // 16) ** 2 > MAX_TIFF_BLOCKS
    assert _refused(_tiled_tiff(8192, 16)).reason == "too_many_segments"
    image = ImageData(_tiled_tiff(256, 16))  # 256 tiles
    assert image.rgb.size == (256, 256)
    buf = io.BytesIO()
    _picture((300, 2000)).save(buf, "TIFF", compression="tiff_deflate")  # one strip per few rows, as written
    assert ImageData(buf.getvalue()).rgb.size == (300, 2000)


# -- through the analyze stage: one outcome each --------------------------------------

class _Fetcher:
    def __init__(self, data: bytes):
        self.data = data

    async def get(self, ev):
        return self.data


class _Store:
    def sighting_identity(self, event_id):
        return None

    def mark_processed(self, source, outcome, event_id):
        pass

    def close(self):
        pass


def _through_the_stage(tmp_path: Path, data: bytes):
    import asyncio
    import json

    from streams.analyze import Analyzer
    from streams.records import SourceRef
    from streams.settings import Settings
    from streams.stage import AnalyzeStage

    settings = Settings(data_dir=tmp_path / "data")
    stage = AnalyzeStage(settings, _Fetcher(data), Analyzer(settings, tmp_path / "blobs"), lambda data, sha256: None,
                         lambda: _Store())
    raw = json.dumps({"event_id": "e-1", "platform": "x", "account_id": "a-1", "posted_at": "2026-05-01T12:00:00Z",
                      "image": {"url": "https://example.com/a.img"}}).encode()
    return asyncio.run(stage.process(raw, SourceRef(topic="t", partition=0, offset=1, run="r1")))


@pytest.mark.parametrize("name", ["gif comment sub-blocks", "png chunks", "jpeg photoshop blocks"])
def test_structure_floods_are_one_decode_dead_letter_each(tmp_path: Path, name: str):
    png, jpeg = _png(_picture()), _jpeg(_picture())
    data = {"gif comment sub-blocks": _gif(b"\x21\xfe" + b"\x01a" * (MAX_GIF_STEPS + 10) + b"\x00"),
            "png chunks": png[:33] + _chunk(b"abCd", b"") * (MAX_PNG_CHUNKS + 10) + png[33:],
            "jpeg photoshop blocks": jpeg[:2] + _photoshop_app13(5000) * 3 + jpeg[2:]}[name]
    started = time.perf_counter()
    r = _through_the_stage(tmp_path, data)
    assert r.op is None and (r.dead.stage, r.dead.reason) == ("decode", "too_many_segments"), r.dead
    assert time.perf_counter() - started < 5


def test_a_picture_hidden_behind_an_icc_bomb_is_a_sighting(tmp_path: Path):
    from streams.records import ClusterOp

    png = _png(_picture((300, 200)))
    data = png[:33] + _chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * (2 << 20), 9)) + png[33:]
    r = _through_the_stage(tmp_path, data)
    assert r.dead is None and ClusterOp.loads(r.op).sighting.width == 300


# -- stealth metadata: read from the stored pixels --------------------------------------

def test_stealth_reading_of_a_palette_picture_adds_no_full_size_rgba_copy(tmp_path: Path):
    # A palette (or grey) picture with a transparency was converted whole to
    # RGBA, 4 bytes a pixel beside the cached RGB decode and outside the budget
    # (a 16384x4000 one, counted at 312 MiB, peaked at 663 MB; 446 MB now). Here
    # 6000x4000: the RGBA copy alone is 92 MiB; the palette decode is 23.
    grown = decoded_then_grown_mib(
        tmp_path, 'Image.linear_gradient("L").resize((6000, 4000)).convert("P").save(path, transparency=0)',
        "assert StealthPngInfoDetector().analyze(image) == []",
        imports="from detectors.plugins.stealth_pnginfo import StealthPngInfoDetector")
    assert grown < 50, grown  # MiB


def _stealth_bits(text: str) -> np.ndarray:
    payload = text.encode()
    bits = "".join(f"{b:08b}" for b in b"stealth_pnginfo" + struct.pack(">I", len(payload) * 8) + payload)
    return np.frombuffer(bits.encode(), np.uint8) - 48


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_stealth_metadata_in_a_stored_alpha_is_still_read(mode: str):
    from detectors.plugins.stealth_pnginfo import StealthPngInfoDetector

    params = "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Model: dreamshaper_8"
    bands = np.full((40, 50, len(mode)), 200, np.uint8)
    alpha = bands[:, :, -1].T.copy().reshape(-1)  # column-major, as the extension writes
    bits = _stealth_bits(params)
    alpha[: len(bits)] = (alpha[: len(bits)] & 0xFE) | bits
    bands[:, :, -1] = alpha.reshape(50, 40).T
    buf = io.BytesIO()
    Image.fromarray(bands, mode).save(buf, "PNG")
    [ev] = StealthPngInfoDetector().analyze(ImageData(buf.getvalue()))
    assert ev.data["parameters"] == params


def test_a_palette_transparency_longer_than_the_palette_does_not_fail_the_stealth_reader():
    # Pillow refused to convert such a picture to RGBA ("palette index out of
    # range"); viewers ignore the extra entries. The detector raised.
    from detectors.plugins.stealth_pnginfo import StealthPngInfoDetector

    img = _picture((64, 48)).quantize(16)
    png = _png(img)
    at = png.index(b"IDAT") - 4
    image = ImageData(png[:at] + _chunk(b"tRNS", b"\x00" * 300) + png[at:])
    assert StealthPngInfoDetector().analyze(image) == []
    assert image.rgb.size == (64, 48)


def test_countless_skipped_text_chunks_are_one_note_not_one_evidence_item_each(tmp_path: Path):
    # Each chunk skipped was a note, and each note an evidence item: 30,000 tiny
    # text chunks beside 70 MB of inflating ones (together over Pillow's total,
    # so all text is skipped) made a 645 KB picture's cluster op 7 MB, and the
    # picture a dead letter (too_large).
    from streams.records import ClusterOp

    png = _png(_picture((300, 200)))
    inflating = b"".join(_chunk(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"A" * 1_000_000, 9)) for i in range(70))
    tiny = b"".join(_chunk(b"tEXt", b"k%d\x00v" % i) for i in range(30_000))
    data = png[:33] + inflating + tiny + png[33:]
    image = ImageData(data)
    assert image.rgb.size == (300, 200)
    assert len(image.notes) <= 5 and image.notes[-1] == f"{70 + 30_000 - 4} more metadata chunks skipped"
    r = _through_the_stage(tmp_path, data)
    assert r.dead is None and ClusterOp.loads(r.op).sighting.width == 300
