"""Pixels -> tensors, for inference and for training.

The training augmentations exist to remove *format shortcuts*: in most
collections AI images are PNG at generator resolution and real photos are
camera JPEGs, so a network can score perfectly by detecting JPEG blocking or
image size. Re-encoding BOTH classes to JPEG at random quality, random
downscaling and blur (Wang et al. 2020, "CNN-generated images are
surprisingly easy to spot... for now") force it to look at content that
survives a repost.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image, ImageFilter

from detectors.models.checkpoint import InputSpec
from detectors.models.pixel_backbone import resized_crops


def _resize_short(img: Image.Image, short: int) -> Image.Image:
    w, h = img.size
    s = short / min(w, h)
    return img.resize((max(short, round(w * s)), max(short, round(h * s))), Image.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    # Even offsets keep the 2x2 grid in phase with a generator's 2x upsampler
    # (when the image was not cropped since), which is what NPR residuals read.
    left, top = (w - size) // 4 * 2, (h - size) // 4 * 2
    return img.crop((left, top, left + size, top + size))


def fit_to_input(img: Image.Image, spec: InputSpec) -> Image.Image:
    """Deterministic geometry for inference. In "crop" mode only images smaller
    than the input are resized: resampling would blur the very pixel-level
    traces NPR-style models read."""
    if spec.mode == "resize" or min(img.size) < spec.size:
        w, h = img.size
        s = spec.size / min(w, h)
        tw, th = max(spec.size, round(w * s)), max(spec.size, round(h * s))
        left, top = (tw - spec.size) // 4 * 2, (th - spec.size) // 4 * 2  # as ``_center_crop``
        # resized whole (as ``_resize_short``) unless that is huge (a thin strip): then the crop's region alone
        return resized_crops(img, (tw, th), [(left, top, left + spec.size, top + spec.size)])[0]
    return _center_crop(img, spec.size)


def to_tensor(img: Image.Image, spec: InputSpec) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def eval_transform(img: Image.Image, spec: InputSpec) -> torch.Tensor:
    return to_tensor(fit_to_input(img, spec), spec)


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


class TrainAugment:
    """Random degradations applied identically (in distribution) to both classes."""

    def __init__(
        self,
        spec: InputSpec,
        *,
        jpeg_p: float = 0.9,
        jpeg_quality: tuple[int, int] = (60, 100),
        resize_p: float = 0.5,
        resize_scale: tuple[float, float] = (0.5, 1.0),
        blur_p: float = 0.2,
        blur_sigma: tuple[float, float] = (0.2, 2.0),
        seed: int | None = None,
    ):
        self.spec = spec
        self.jpeg_p, self.jpeg_quality = jpeg_p, jpeg_quality
        self.resize_p, self.resize_scale = resize_p, resize_scale
        self.blur_p, self.blur_sigma = blur_p, blur_sigma
        self.rng = random.Random(seed)

    def describe(self) -> dict[str, object]:
        return {
            "jpeg_p": self.jpeg_p,
            "jpeg_quality": list(self.jpeg_quality),
            "resize_p": self.resize_p,
            "resize_scale": list(self.resize_scale),
            "blur_p": self.blur_p,
            "blur_sigma": list(self.blur_sigma),
            "random_crop": True,
            "hflip": True,
        }

    def __call__(self, img: Image.Image) -> torch.Tensor:
        r, size = self.rng, self.spec.size
        img = img.convert("RGB")
        if r.random() < self.resize_p:
            s = r.uniform(*self.resize_scale)
            w, h = img.size
            if min(w, h) * s >= size:
                img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
        if r.random() < self.blur_p:
            img = img.filter(ImageFilter.GaussianBlur(r.uniform(*self.blur_sigma)))
        if r.random() < self.jpeg_p:
            img = jpeg_roundtrip(img, r.randint(*self.jpeg_quality))
        if self.spec.mode == "resize" or min(img.size) < size:
            img = _resize_short(img, size)
        w, h = img.size
        left, top = r.randint(0, (w - size) // 2) * 2, r.randint(0, (h - size) // 2) * 2  # even: see _center_crop
        img = img.crop((left, top, left + size, top + size))
        if r.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img, self.spec)
