"""The hostile corpus: events and files an attacker (or a broken producer)
sends, each with the one outcome it must end as.

``python -m tests.hostile.corpus`` regenerates the committed files next to
this module (``events.jsonl``, ``expected.json``, ``files/``). Three things
cannot be committed and are made at test time by ``materialize``: a FIFO and
a symlink loop under the image root, and the URL of a slow-drip server.

Outcomes: ``sighting`` or ``dead:<stage>:<reason>``. Events whose id is not
usable (too long, a lone surrogate, unparseable) are listed under
``anonymous`` as the dead letters they must produce, in feed order.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def gif_canvas_bomb(w: int = 12_000, h: int = 8_000) -> bytes:
    """~40 bytes declaring a 96 MP canvas with one 1x1 frame."""
    b = b"GIF89a" + struct.pack("<HH", w, h) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    b += b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00" + b"\x3b"
    return b


def rgba_png_bomb(w: int = 9_000, h: int = 9_000) -> bytes:
    """~300 KB of zeros that decode to 81 MP of RGBA (~310 MiB)."""
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * (w * 4)
    body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))


def picture_png(seed: int, size: tuple[int, int] = (256, 192)) -> bytes:
    from tests.support import picture

    buf = io.BytesIO()
    picture(seed, size).save(buf, "PNG")
    return buf.getvalue()


def ztxt_padded_png(seed: int = 7, mb: int = 50) -> bytes:
    """A real picture carrying a zTXt chunk that inflates to ``mb`` MB: Pillow
    refuses the whole file, which used to let a fake escape analysis."""
    png = picture_png(seed)
    comp = zlib.compress(b"A" * (mb << 20), 9)
    ztxt = _chunk(b"zTXt", b"Comment\x00\x00" + comp)
    return png[:33] + ztxt + png[33:]  # right after IHDR (8 + 25 bytes)


def _event(event_id: str, image: dict, **extra) -> dict:
    doc = {"schema_version": 1, "event_id": event_id, "platform": "x", "account_id": f"acct-{event_id[:40]}",
           "posted_at": "2026-05-01T12:00:00Z", "image": image}
    doc.update(extra)
    return doc


def build() -> tuple[list[bytes], dict]:
    """Lines of the feed and the expected outcome of each."""
    lines: list[bytes] = []
    expected: dict[str, str] = {}
    anonymous: list[str] = []

    def add(doc: dict | bytes, outcome: str, event_id: str | None = None) -> None:
        lines.append(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        if event_id is None:
            anonymous.append(outcome)
        else:
            expected[event_id] = outcome

    for i in (1, 2, 3):
        add(_event(f"ok-{i}", {"path": f"files/ok-{i}.png"}), "sighting", f"ok-{i}")
    add(_event("ok-unknown-field", {"path": "files/ok-1.png"}, future_field={"a": 1}), "sighting", "ok-unknown-field")
    add(_event("ok-long-text", {"path": "files/ok-2.png"}, text="spam " * 150_000), "sighting", "ok-long-text")
    add(_event("ok-ztxt", {"path": "files/ztxt.png"}), "sighting", "ok-ztxt")
    # Defect class 1: exceptions from URL and path handling.
    add(_event("url-port", {"url": "http://example.com:99999/a.jpg"}), "dead:fetch:bad_url", "url-port")
    add(_event("url-bracket", {"url": "http://[::1/x"}), "dead:fetch:bad_url", "url-bracket")
    add(_event("path-nul", {"path": "files/a\x00b.png"}), "dead:fetch:bad_path", "path-nul")
    add(_event("path-long", {"path": "files/" + "n" * 300 + ".png"}), "dead:fetch:bad_path", "path-long")
    add(_event("path-loop", {"path": "loop/a.png"}), "dead:fetch:bad_path", "path-loop")
    add(json.dumps(_event("big-int", {"path": "files/ok-1.png"}, engagement={"likes": 1})).replace(
        '"likes": 1', '"likes": ' + "9" * 5000).encode(), "dead:validate:malformed_json")  # unparseable: no id
    # Defect class 2: lines that killed replay/ingest.
    add(b"[" * 5000 + b"]" * 5000, "dead:validate:malformed_json")
    add(json.dumps(_event("surrogate-\ud800", {"path": "files/ok-1.png"})).encode(), "dead:validate:malformed_json")
    add(_event("x" * 600_000, {"path": "files/ok-1.png"}), "dead:validate:schema_violation")
    add(b"{" + b'"pad": "' + b"z" * 990_000 + b'"', "dead:validate:malformed_json")  # near-limit garbage
    # Over the broker's message size: refused by ingest itself, whose dead
    # letter used to carry the whole 1 MB event id (and be refused in turn).
    add(_event("y" * 1_050_000, {"path": "files/ok-1.png"}), "dead:validate:too_large")
    # Defect class 3: hangs.
    add(_event("fifo", {"path": "fifo.png"}), "dead:fetch:not_a_file", "fifo")
    add(_event("slow-drip", {"url": "{SLOW_URL}"}), "dead:fetch:timeout", "slow-drip")
    # Defect class 5: a future-dated repost.
    add(_event("future", {"path": "files/ok-3.png"}, posted_at="9999-12-31T23:59:59Z"),
        "dead:validate:future_posted_at", "future")
    # Defect class 7: memory bombs, refused from the header.
    add(_event("gif-bomb", {"path": "files/gif-bomb.gif"}), "dead:decode:memory_budget", "gif-bomb")
    add(_event("rgba-bomb", {"path": "files/rgba-bomb.png"}), "dead:decode:memory_budget", "rgba-bomb")
    # Defect class 8: the same event id with a different picture.
    add(_event("ok-3", {"path": "files/ok-1.png"}), "dead:dedupe:conflict", "ok-3#2")
    # Forward compatibility: an unknown schema_version stays a clear dead letter.
    add({**_event("v2", {"path": "files/ok-1.png"}), "schema_version": 2}, "dead:validate:unsupported_version", "v2")
    add(_event("bad-b64", {"base64": "!!!not base64!!!"}), "dead:fetch:bad_base64", "bad-b64")
    # Defect class 9: different events failing alike were stored as one dead
    # letter: two posts under one id, two id-less lines sharing their first 512 bytes.
    add(_event("dl-same", {"path": "files/ok-1.png"}, engagement={"likes": -1}), "dead:validate:schema_violation",
        "dl-same")
    add(_event("dl-same", {"path": "files/ok-1.png"}, hashtags=[f"t{i}" for i in range(65)]),
        "dead:validate:schema_violation", "dl-same#2")
    for tail in (b'"a": 1}', b'"b": 2}'):
        add(b'{"pad": "' + b"z" * 600 + b'", ' + tail, "dead:validate:schema_violation")
    # Defect class 10: the same id and picture from another account was dropped
    # as a repeat (and could be the copy kept): a producer's bug, made visible.
    add(_event("ok-2", {"path": "files/ok-2.png"}, account_id="acct-someone-else"), "dead:dedupe:conflict", "ok-2#2")
    return lines, {"events": expected, "anonymous": anonymous, "refused_at_ingest": 1}


def write() -> None:
    FILES.mkdir(parents=True, exist_ok=True)
    for i in (1, 2, 3):
        (FILES / f"ok-{i}.png").write_bytes(picture_png(100 + i))
    (FILES / "ztxt.png").write_bytes(ztxt_padded_png())
    (FILES / "gif-bomb.gif").write_bytes(gif_canvas_bomb())
    (FILES / "rgba-bomb.png").write_bytes(rgba_png_bomb())
    lines, expected = build()
    (HERE / "events.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def materialize(dest: Path, slow_url: str) -> Path:
    """Copy the corpus into ``dest`` with what git cannot hold; returns the feed."""
    import shutil

    shutil.copytree(FILES, dest / "files")
    os.mkfifo(dest / "fifo.png")
    (dest / "loop").symlink_to(dest / "loop2")
    (dest / "loop2").symlink_to(dest / "loop")
    feed = dest / "events.jsonl"
    feed.write_bytes((HERE / "events.jsonl").read_bytes().replace(b"{SLOW_URL}", slow_url.encode()))
    return feed


def expected() -> dict:
    return json.loads((HERE / "expected.json").read_text())


if __name__ == "__main__":
    write()
