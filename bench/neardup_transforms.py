"""The repost transforms the near-duplicate bench measures recall on."""

from __future__ import annotations

import io
from typing import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps


def _jpeg_bytes(img: Image.Image, q: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    dw, dh = round(w * (1 - frac) / 2), round(h * (1 - frac) / 2)
    return img.crop((dw, dh, w - dw, h - dh))


def _crop_corner(img: Image.Image, frac: float) -> Image.Image:
    # an off-centre crop: keeps the top-left frac x frac of the picture
    w, h = img.size
    return img.crop((0, 0, round(w * frac), round(h * frac)))


def _caption(img: Image.Image) -> Image.Image:
    # meme-style: a line of bold text over the lower part of the picture
    out = img.copy()
    w, h = out.size
    font = ImageFont.load_default(size=max(12, h // 12))
    d = ImageDraw.Draw(out)
    d.text((w // 20, h - h // 6), "BREAKING: this is real!!", font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return out


def screenshot(img: Image.Image) -> Image.Image:
    """A phone screenshot of a post: white margins, a dark top bar, text below
    (also used by the tests, so they check the transform the bench measures)."""
    w, h = img.size
    pad, top, bottom = w // 20, h // 8, h // 6
    out = Image.new("RGB", (w + 2 * pad, h + top + bottom), (255, 255, 255))
    ImageDraw.Draw(out).rectangle((0, 0, out.width, top // 2), fill=(20, 20, 30))
    out.paste(img, (pad, top))
    ImageDraw.Draw(out).text((pad, top + h + 8), "@someone  2h  1.2k reposts", fill=(60, 60, 60))
    return out


def _letterbox(img: Image.Image) -> Image.Image:
    # a 16:9 black frame around the picture (video frame grabs, padded uploads)
    w, h = img.size
    ow = max(w + 2, round(h * 16 / 9))
    oh = max(h, round(ow * 9 / 16))
    out = Image.new("RGB", (ow, oh), (0, 0, 0))
    out.paste(img, ((ow - w) // 2, (oh - h) // 2))
    return out


# name -> bytes of the transformed repost; all re-encoded as JPEG q85 unless the
# transform *is* the encoding
TRANSFORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg_q70": lambda im: _jpeg_bytes(im, 70),
    "jpeg_q50": lambda im: _jpeg_bytes(im, 50),
    "resize_0.5": lambda im: _jpeg_bytes(im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.BILINEAR)),
    "resize_0.25": lambda im: _jpeg_bytes(im.resize((max(1, im.width // 4), max(1, im.height // 4)), Image.Resampling.BILINEAR)),
    "crop_90": lambda im: _jpeg_bytes(_crop(im, 0.9)),
    "crop_80": lambda im: _jpeg_bytes(_crop(im, 0.8)),
    "crop_90_corner": lambda im: _jpeg_bytes(_crop_corner(im, 0.9)),
    "caption": lambda im: _jpeg_bytes(_caption(im)),
    "mirror": lambda im: _jpeg_bytes(ImageOps.mirror(im)),
    "brightness_+20%": lambda im: _jpeg_bytes(ImageEnhance.Brightness(im).enhance(1.2)),
    "screenshot_border": lambda im: _jpeg_bytes(screenshot(im)),
    "screenshot_q50": lambda im: _jpeg_bytes(screenshot(im), 50),
    "letterbox_black": lambda im: _jpeg_bytes(_letterbox(im)),
}


# ---------------------------------------------------------------- cluster bench
# Repost shapes the cluster bench adds: captions at either edge (a bar or text
# covering up to 1/6 of the picture), plain borders, off-centre crops.
def _bar(img: Image.Image, frac: float, where: str, fill=(0, 0, 0), text: str | None = None) -> Image.Image:
    out = img.copy()
    w, h = out.size
    bh = max(1, round(h * frac))
    boxes = {"top": [(0, 0, w, bh)], "bottom": [(0, h - bh, w, h)], "both": [(0, 0, w, bh // 2), (0, h - bh // 2, w, h)]}[where]
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, bh // 2 if where != "both" else bh // 4))
    for box in boxes:
        d.rectangle(box, fill=fill)
        if text:
            ink = (255, 255, 255) if sum(fill) < 384 else (0, 0, 0)
            d.text((box[0] + w // 30, box[1] + (box[3] - box[1]) // 5), text, font=font, fill=ink)
    return out


def _border(img: Image.Image, frac: float = 0.05, fill=(255, 255, 255)) -> Image.Image:
    w, h = img.size
    p = max(1, round(min(w, h) * frac))
    out = Image.new("RGB", (w + 2 * p, h + 2 * p), fill)
    out.paste(img.convert("RGB"), (p, p))
    return out


def _crop_box(img: Image.Image, x0: float, y0: float, x1: float, y1: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * x0), round(h * y0), round(w * x1), round(h * y1)))


CLUSTER_TRANSFORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg_q70": TRANSFORMS["jpeg_q70"],
    "jpeg_q50": TRANSFORMS["jpeg_q50"],
    "resize_0.5": TRANSFORMS["resize_0.5"],
    "resize_0.25": TRANSFORMS["resize_0.25"],
    "crop_90": TRANSFORMS["crop_90"],
    "crop_80": TRANSFORMS["crop_80"],
    "crop_90_topleft": TRANSFORMS["crop_90_corner"],
    "crop_85_bottomright": lambda im: _jpeg_bytes(_crop_box(im, 0.15, 0.15, 1.0, 1.0)),
    "crop_90_left": lambda im: _jpeg_bytes(_crop_box(im, 0.0, 0.05, 0.9, 0.95)),
    "caption_text": TRANSFORMS["caption"],
    "bar_bottom_1/8_black": lambda im: _jpeg_bytes(_bar(im, 1 / 8, "bottom", text="BREAKING NEWS")),
    "bar_top_1/8_white": lambda im: _jpeg_bytes(_bar(im, 1 / 8, "top", fill=(255, 255, 255), text="you won't believe this")),
    "bar_bottom_1/6_white": lambda im: _jpeg_bytes(_bar(im, 1 / 6, "bottom", fill=(255, 255, 255), text="share before they delete it")),
    "bars_top+bottom_1/6": lambda im: _jpeg_bytes(_bar(im, 1 / 6, "both", text="WHEN YOU SEE IT")),
    "border_white": lambda im: _jpeg_bytes(_border(im)),
    "border_black_q60": lambda im: _jpeg_bytes(_border(im, 0.08, (0, 0, 0)), 60),
    "mirror": TRANSFORMS["mirror"],
    "mirror_crop_90": lambda im: _jpeg_bytes(ImageOps.mirror(_crop(im, 0.9))),
    "brightness_+20%": TRANSFORMS["brightness_+20%"],
    "screenshot": TRANSFORMS["screenshot_border"],
    "screenshot_q50": TRANSFORMS["screenshot_q50"],
    "letterbox_black": TRANSFORMS["letterbox_black"],
    "screenshot_of_crop_90": lambda im: _jpeg_bytes(screenshot(_crop(im, 0.9))),
}
