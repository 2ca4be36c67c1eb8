"""A deterministic demo feed: the bundled data for ``deepwatch demo`` and the
end-to-end tests. Pictures are drawn procedurally (no downloaded data), and
the feed exercises every path a desk cares about:

* an AI picture carrying AUTOMATIC1111 generator metadata that goes viral as
  recompressed, resized and cropped reposts (metadata stripped on reposts)
  -> one cluster, likely AI, exactly one alert;
* a ComfyUI picture shared a few times -> likely AI, no alert (not viral);
* camera photos, one of them viral -> no alert (no evidence of generation);
* a duplicated event (producer retry) -> counted once;
* hostile and malformed input -> dead letters with reasons.
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, PngImagePlugin

BASE_TIME = datetime(2026, 11, 20, 10, 0, 0, tzinfo=timezone.utc)


def scene(seed: int, size: tuple[int, int] = (768, 512)) -> Image.Image:
    """A smooth synthetic 'photo': perceptual hashes of smooth structure are
    stable under recompression and resizing, as for real photos."""
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size)
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        f = y / h
        draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * f) for a, b in zip(top, bottom)))
    for _ in range(rng.randrange(6, 12)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randrange(60, w // 2), y0 + rng.randrange(60, h // 2)
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    return img.filter(ImageFilter.GaussianBlur(2))


def jpeg_bytes(img: Image.Image, quality: int = 90, exif: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def camera_jpeg(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x0110] = "Canon EOS 5D Mark IV"  # Model
    return jpeg_bytes(img, 92, exif.tobytes())


def a1111_png(img: Image.Image, prompt: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        f"{prompt}\nNegative prompt: blurry, lowres\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, "
        f"Seed: 1234567, Size: {img.width}x{img.height}, Model hash: 31e35c80fc, Model: sd_xl_base_1.0",
    )
    buf = io.BytesIO()
    img.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def comfyui_png(img: Image.Image, prompt: str) -> bytes:
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 20, "cfg": 3.5, "model": ["4", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    buf = io.BytesIO()
    img.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny file whose header claims 10 gigapixels: must be refused unread."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@dataclass
class FeedExpectations:
    """What the pipeline must conclude from the feed (asserted by the e2e test)."""

    events: int = 0
    viral_fake_event_ids: list[str] = field(default_factory=list)
    viral_fake_sha256: str = ""
    comfy_event_ids: list[str] = field(default_factory=list)
    viral_real_event_ids: list[str] = field(default_factory=list)
    dead_letter_reasons: dict[str, str] = field(default_factory=dict)  # event id (or "#line") -> stage
    duplicate_event_id: str = ""
    distinct_pictures: int = 0


def build_feed(out_dir: Path, *, burst: int = 14, real_photos: int = 4) -> tuple[Path, FeedExpectations]:
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    exp = FeedExpectations()
    lines: list[str] = []
    n = 0

    def save(name: str, data: bytes) -> str:
        (images / name).write_bytes(data)
        return f"images/{name}"

    def event(path: str | None, minutes: float, account: int, platform: str = "x", *, url: str | None = None,
              text: str = "", eid: str | None = None, likes: int = 0, reposts: int = 0) -> str:
        nonlocal n
        n += 1
        eid = eid or f"evt-{n:04d}"
        doc = {
            "schema_version": 1, "event_id": eid, "platform": platform, "post_id": f"p{n}",
            "post_url": f"https://{platform}.example/post/{n}", "account_id": f"acct-{account}",
            "account_handle": f"@user{account}", "posted_at": (BASE_TIME + timedelta(minutes=minutes)).isoformat(),
            "text": text, "lang": "en", "hashtags": ["breaking"],
            "engagement": {"likes": likes, "reposts": reposts, "replies": 0, "views": likes * 40},
            "image": {"url": url} if url else {"path": path},
        }
        lines.append(json.dumps(doc))
        return eid

    # The viral fake: original with generator metadata, then stripped reposts.
    fake = scene(1001)
    original = a1111_png(fake, "a flooded subway station after the storm, news photo, photorealistic")
    exp.viral_fake_sha256 = __import__("hashlib").sha256(original).hexdigest()
    variants = [
        save("flood_original.png", original),
        save("flood_q70.jpg", jpeg_bytes(fake, 70)),
        save("flood_half.jpg", jpeg_bytes(fake.resize((fake.width // 2, fake.height // 2)), 85)),
        save("flood_crop95.jpg", jpeg_bytes(fake.crop((19, 12, fake.width - 19, fake.height - 12)), 88)),
        save("flood_mirror.jpg", jpeg_bytes(fake.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 85)),
    ]
    exp.viral_fake_event_ids.append(event(variants[0], 0, 1, text="Subway flooded right now!!"))
    for i in range(burst):
        exp.viral_fake_event_ids.append(event(
            variants[1 + i % 4], 1 + i * 0.25, 100 + i, platform=["x", "bsky", "threads"][i % 3],
            text="RT flooded subway", likes=50 + i, reposts=10 + i,
        ))
    # A producer retry: the same event id again. Counted once.
    exp.duplicate_event_id = exp.viral_fake_event_ids[3]
    lines.append(lines[3])

    # A ComfyUI picture, shared a few times: likely AI, not viral.
    comfy = scene(2002)
    exp.comfy_event_ids = [
        event(save("protest_comfy.png", comfyui_png(comfy, "crowd storming a parliament, press photo")), 2, 7),
        event(save("protest_q80.jpg", jpeg_bytes(comfy, 80)), 30, 8),
        event(save("protest_q80.jpg", jpeg_bytes(comfy, 80)), 45, 9),
    ]

    # Camera photos; the first goes viral but carries no evidence of generation.
    for k in range(real_photos):
        photo = scene(3000 + k)
        p = save(f"photo_{k}.jpg", camera_jpeg(photo))
        ids = [event(p, 3 + k, 20 + k)]
        if k == 0:
            repost = save("photo_0_small.jpg", jpeg_bytes(photo.resize((384, 256)), 75))
            ids += [event(repost, 4 + i * 0.2, 200 + i, platform="bsky") for i in range(burst)]
            exp.viral_real_event_ids = ids
    exp.distinct_pictures = 2 + real_photos

    # Hostile and malformed input: each must be dead-lettered with a reason.
    lines.append("{this is not json")
    exp.dead_letter_reasons[f"#{len(lines)}"] = "validate"
    bad = json.loads(lines[0])
    del bad["account_id"]
    bad["event_id"] = "evt-missing-account"
    lines.append(json.dumps(bad))
    exp.dead_letter_reasons["evt-missing-account"] = "validate"
    exp.dead_letter_reasons[event(None, 5, 30, url="http://127.0.0.1:9/internal.jpg", eid="evt-ssrf")] = "fetch"
    exp.dead_letter_reasons[event("../../../../etc/passwd", 5, 31, eid="evt-escape")] = "fetch"
    truncated = jpeg_bytes(scene(4004))[:3000]
    exp.dead_letter_reasons[event(save("truncated.jpg", truncated), 5, 32, eid="evt-truncated")] = "decode"
    exp.dead_letter_reasons[event(save("bomb.png", bomb_png()), 5, 33, eid="evt-bomb")] = "decode"

    feed = out_dir / "feed.jsonl"
    feed.write_text("\n".join(lines) + "\n")
    exp.events = len(lines)
    return feed, exp
