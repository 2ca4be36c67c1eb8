"""Safe, lazy image decoding shared by hashing and detectors.

Everything that turns untrusted bytes into pixels goes through here so the
limits (pixel count, dimensions, truncation) are enforced in one place.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from PIL import Image, ImageOps

try:  # HEIC/HEIF is what phones upload; Pillow alone cannot decode it
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - optional at import, a dependency in pyproject
    pass

# Pillow's own bomb check (warn above ~89 Mpx, fail above ~179 Mpx) stays as a
# backstop; our lower, configurable limit is checked from the header first.


class ImageRejected(ValueError):
    """The bytes are not an image we are willing to decode; ``reason`` is
    a short machine-readable code, the message is for humans."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 100_000_000  # 50-200 MP phone cameras exist; Pillow refuses > ~179 MP regardless
    max_dimension: int = 16_384
    max_bytes: int = 25 * 1024 * 1024


class ImageData:
    """Undecoded image bytes plus lazily decoded views of them."""

    def __init__(self, data: bytes, *, path: str | None = None, limits: DecodeLimits | None = None):
        self.data = data
        self.path = path
        self.limits = limits or DecodeLimits()
        if len(data) == 0:
            raise ImageRejected("empty", "image is empty (0 bytes)")
        if len(data) > self.limits.max_bytes:
            raise ImageRejected("too_large", f"image is {len(data)} bytes, limit {self.limits.max_bytes}")
        header = self.open()  # validates format and dimensions without decoding pixels
        self.format: str = (header.format or "UNKNOWN").upper()
        self.size: tuple[int, int] = header.size

    @classmethod
    def from_path(cls, path: str | Path, limits: DecodeLimits | None = None) -> "ImageData":
        return cls(Path(path).read_bytes(), path=str(path), limits=limits)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def open(self) -> Image.Image:
        """A fresh, not-yet-decoded PIL image: for metadata (info, text chunks, EXIF)."""
        try:
            img = Image.open(io.BytesIO(self.data))
        except Image.DecompressionBombError as e:
            raise ImageRejected("decompression_bomb", str(e)) from e
        except Exception as e:  # PIL raises many types for garbage input
            raise ImageRejected("undecodable", f"not a decodable image: {e}") from e
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageRejected("empty", f"image has no pixels ({w}x{h})")
        if max(w, h) > self.limits.max_dimension:
            raise ImageRejected("too_large", f"{w}x{h} exceeds max dimension {self.limits.max_dimension}")
        if w * h > self.limits.max_pixels:
            raise ImageRejected(
                "decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds limit {self.limits.max_pixels}"
            )
        return img

    def _decode(self, img: Image.Image, mode: str = "RGB", *, oriented: bool = True) -> Image.Image:
        try:
            with warnings.catch_warnings():  # palette-transparency warnings: irrelevant to analysis
                warnings.simplefilter("ignore")
                img.load()
                if oriented:
                    img = ImageOps.exif_transpose(img)
                return img.convert(mode)
        except Exception as e:
            raise ImageRejected("undecodable", f"image data is truncated or corrupt: {e}") from e

    def pixels(self, mode: str = "RGB", *, oriented: bool = True) -> Image.Image:
        """Full-resolution pixels in ``mode``. ``oriented=False`` keeps the
        stored pixel grid (what a watermark or LSB payload was written into);
        an image without EXIF rotation reuses the cached ``rgb`` decode."""
        if mode == "RGB" and (oriented or self.orientation == 1):
            return self.rgb
        return self._decode(self.open(), mode, oriented=oriented)

    @cached_property
    def orientation(self) -> int:
        try:
            return int(self.open().getexif().get(0x0112, 1) or 1)
        except Exception:  # unreadable EXIF: treat as unrotated
            return 1

    @cached_property
    def rgb(self) -> Image.Image:
        """Full-resolution RGB, EXIF orientation applied."""
        return self._decode(self.open())

    def thumbnail(self, min_side: int = 128) -> Image.Image:
        """A small RGB view, at least ``min_side`` on its short side where the
        source allows. JPEG draft mode decodes at 1/2..1/8 scale directly from
        the DCT coefficients, which is most of the hashing speed-up."""
        cached = self._thumbs.get(min_side)
        if cached is not None:
            return cached
        img = self.open()
        if img.format == "JPEG":
            w, h = img.size
            scale = max(1, min(w, h) // min_side)
            if scale > 1:
                img.draft("RGB", (w // scale, h // scale))
        out = self._decode(img)
        self._thumbs[min_side] = out
        return out

    @cached_property
    def _thumbs(self) -> dict[int, Image.Image]:
        return {}
