"""Labelled pictures for the pixel probe: manifests, re-post variants, feature cache.

A *manifest* is a CSV with at least ``file,label`` (1 = AI) and optionally
``generator``, ``category``, ``repo``/``source``. Several manifests can be
combined; every sample gets a leave-generator-out *group*:

* AI pictures are grouped by generator (``group_by="generator"``) or, more
  strictly, by generator *family* (``group_by="family"``: all StyleGAN
  derivatives are one family, all Stable Diffusion 1.x/2.x one family ...),
  so a fold never trains on a sibling of what it tests on;
* real photos are grouped by where they came from (repository / camera), so
  real photos are split into folds too.

Variants (``variant_bytes``) are what a picture looks like after a re-post:
``published`` (the file as is), ``reposted`` (metadata stripped, long side
<= 1600 px, JPEG q80), ``aug<k>`` (random JPEG q60-95, resize 0.5-1.0,
crop, mild blur; seeded per picture) and ``jpeg<k>`` (a re-post at random
JPEG q60-95 and framing, native scale). Both classes get the same treatment,
which removes the format shortcut (AI = PNG, real = camera JPEG).
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from detectors.atomic_file import write_atomically
from detectors.models.dataset import REPOST_MAX_SIDE as REPOST_LONG_SIDE  # noqa: F401 (re-exported)
from detectors.models.dataset import manifest_rows  # one reading of the format (columns, labels 0/1)
from detectors.models.dataset import repost_bytes as repost, repost_rgb  # noqa: F401 (one re-post for all)

if TYPE_CHECKING:
    from detectors.imagedata import ImageData


# Generator family by keyword, first match wins (lower-cased generator text).
_FAMILIES = [
    ("stylegan|pixel2style2pixel|restyle|sam age|interfacegan|pggan|alae", "stylegan-family"),
    ("sdxl|stability ai model", "sdxl"),
    ("sd3", "sd3"),
    ("stable cascade|stable_cascade", "stable-cascade"),
    ("karlo|unclip", "unclip"),
    ("stable diffusion|ic-light|ip-adapter|lcm|inpaint|area_composition|2_pass|discord", "sd1-2"),
    ("kandinsky", "kandinsky"),
    ("vqgan", "vqgan-clip"),
    ("infinity", "infinity"),
    ("biggan", "biggan"),
    ("flux", "flux"),
    ("hidream", "hidream"),
    ("chroma", "chroma"),
]


def generator_name(generator: str) -> str:
    """The generator without its parenthesised provenance notes ("SD 2.0-base (Core ML)" -> "sd 2.0-base")."""
    g = re.sub(r"\s*\(.*", "", generator.lower()).strip().removeprefix("comfyui:")
    return g or "unknown"


def generator_family(generator: str) -> str:
    g = generator.lower()
    for pattern, family in _FAMILIES:
        if re.search(pattern, g):
            return family
    g = g.removeprefix("comfyui:")
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(.*?\)", "", g)).strip("-") or "unknown"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    generator: str
    group: str
    category: str
    dataset: str

    @property
    def key(self) -> str:
        return hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:24]


def read_manifest(path: Path, group_by: str = "generator") -> list[Sample]:
    """Samples of one manifest CSV; file paths are relative to its folder.

    ``group_by`` is ``generator`` (each generator held out on its own) or
    ``family`` (all StyleGAN derivatives together, all SD 1.x/2.x together...).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    root = path.parent
    out = []
    for row, label in manifest_rows(path):
        generator = (row.get("generator") or "unknown").strip()
        source = (row.get("repo") or row.get("source") or "").split("@")[0]
        if label:
            group = "ai:" + (generator_family(generator) if group_by == "family" else generator_name(generator))
        else:
            group = "real:" + (source or generator_family(generator))
        out.append(
            Sample(root / row["file"].strip(), label, generator, group, (row.get("category") or "general").strip(), root.name)
        )
    return out


def file_sha256(path: Path) -> str | None:
    """A training file's content digest (None when it cannot be read: it was skipped anyway)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def manifest_digest(paths: list[Path]) -> str:
    """sha256 over the manifests' bytes, in the order given: names the training data in the model card."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update((p / "manifest.csv" if p.is_dir() else p).read_bytes())
    return h.hexdigest()


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _open_rgb(data: bytes) -> Image.Image:
    """Decoded, oriented RGB (``ImageData.rgb``: 16-bit and float samples scaled to 8 bits,
    within the decode limits): a picture ``ImageData`` refuses raises its ``ImageRejected``
    here too, instead of a plain Pillow decode of any size."""
    from detectors.imagedata import ImageData

    return ImageData(data).rgb


# A JPEG at or below this estimated quality and within the re-post long side is taken as a
# re-post as it is: platforms re-encode below q90, cameras, phones and editors mostly save at q90
# and above. Measured leave-generator-out as published (docs/pixel-detector.md, sixth round):
# <= 85 and <= 89 gave the same gain; taking q90 files as they are gave most of it back (the
# shared sets hold many real photos saved at exactly q90), any quality all of it.
REPOST_LIKE_MAX_QUALITY = 89
# The IJG (libjpeg) luminance table at quality 50: quality scales it (``jpeg_quality``).
_IJG_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
                      92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)


def jpeg_quality(img: Image.Image) -> float | None:
    """Estimated IJG quality (1-100) of an opened JPEG from its luminance quantization table:
    libjpeg scales the quality-50 table by 200 - 2q percent above q50 and by 5000 / q below
    (Pillow's tables are in natural order, like ``_IJG_LUMA``). Exact to about 0.1 for libjpeg
    encoders; a rough figure for encoders with tables of their own."""
    tables = getattr(img, "quantization", None) or {}
    luma = tables.get(0)
    if luma is None or len(luma) < 64:
        return None
    scale = float(np.mean(np.asarray(luma[:64], dtype=np.float64) / _IJG_LUMA)) * 100
    return (200 - scale) / 2 if scale <= 100 else 5000 / scale


def repost_like(image: ImageData) -> bool:
    """A JPEG no larger than a re-post and compressed at least as much as platforms do."""
    from detectors.imagedata import JPEG_FORMATS

    if image.format not in JPEG_FORMATS or max(image.size) > REPOST_LONG_SIDE:  # an MPO is a JPEG too
        return False
    q = jpeg_quality(image.header)
    return q is not None and round(q) <= REPOST_LIKE_MAX_QUALITY


def canonical(image: ImageData) -> ImageData:
    """``image`` as the probe was trained to see it: as it is when it looks like a re-post, else
    re-posted (``repost``: the training rows' encoding), from pixels decoded within its limits."""
    if repost_like(image):
        return image
    from detectors.imagedata import ImageData

    return ImageData(repost_rgb(image.rgb), path=image.path, limits=image.limits)


def augment(data: bytes, seed: int) -> bytes:
    """One random re-encoding (same distribution for both classes)."""
    rng = random.Random(seed)
    img = _open_rgb(data)
    w, h = img.size
    area = rng.uniform(0.6, 1.0)
    cw, ch = max(64, int(w * area**0.5)), max(64, int(h * area**0.5))
    left, top = rng.randint(0, max(0, w - cw)), rng.randint(0, max(0, h - ch))
    img = img.crop((left, top, left + cw, top + ch))
    s = rng.uniform(0.5, 1.0)
    long_side = max(img.size) * s
    if long_side > REPOST_LONG_SIDE:
        s *= REPOST_LONG_SIDE / long_side
    if s < 0.999:
        img = img.resize((max(32, round(img.width * s)), max(32, round(img.height * s))), Image.BICUBIC)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return _jpeg(img, rng.randint(60, 95))


def reencode(data: bytes, seed: int) -> bytes:
    """A re-post at another JPEG quality (q60-95) and framing (crop 80-100% of the area at even
    offsets), keeping the native scale: no resize below the re-post cap, no blur. Downscaling and
    blur erase the pixel-level generator traces the probe relies on, and as training rows they
    measured worse leave-generator-out (docs/pixel-detector.md, third round)."""
    rng = random.Random(seed)
    img = _open_rgb(data)
    img.thumbnail((REPOST_LONG_SIDE, REPOST_LONG_SIDE), Image.BICUBIC)
    w, h = img.size
    side = rng.uniform(0.8, 1.0) ** 0.5
    cw, ch = max(64, int(w * side)), max(64, int(h * side))
    left = rng.randint(0, max(0, w - cw)) // 2 * 2
    top = rng.randint(0, max(0, h - ch)) // 2 * 2
    return _jpeg(img.crop((left, top, left + cw, top + ch)), rng.randint(60, 95))


def variant_bytes(sample: Sample, variant: str) -> bytes:
    data = sample.path.read_bytes()
    if variant == "published":
        return data
    if variant == "reposted":
        return repost(data)
    if variant.startswith("jpeg"):
        return reencode(data, int(sample.key[:8], 16) + 104729 * (1 + int(variant[4:])))
    if variant.startswith("aug"):
        return augment(data, int(sample.key[:8], 16) + 7919 * int(variant[3:]))
    raise ValueError(f"unknown variant {variant!r}")


class FeatureCache:
    """Per-crop backbone taps, one ``.npz`` per (picture, variant, backbone, decode).

    Backbone features of a frozen network never change, so every experiment
    and every retraining reuses them; only the small probe is refitted.
    """

    def __init__(self, root: Path, backbone: str, draft_min_side: int, max_crops: int = 5, int8="packaged"):
        # int8 features live apart from fp32 ones, keyed by the ranges that made them; the default
        # matches ``Backbone``'s (the packaged head's ranges), so the two never disagree.
        from detectors.models.pixel_backbone import PACKAGED, packaged_int8

        int8 = packaged_int8(backbone) if int8 == PACKAGED else int8
        tag = f"-int8-{int8.digest()[:12]}" if int8 is not None else ""
        self.root = Path(root) / f"{backbone}-d{draft_min_side}-c{max_crops}{tag}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_crops = max_crops
        self._memo: dict[Path, dict[str, np.ndarray]] = {}

    def path(self, sample: Sample, variant: str) -> Path:
        return self.root / f"{sample.key}-{variant}.npz"

    def get(self, sample: Sample, variant: str) -> dict[str, np.ndarray] | None:
        # Cross-validation reads every file once per fold: keep them in memory (float16, ~60 kB each).
        p = self.path(sample, variant)
        hit = self._memo.get(p)
        if hit is None:
            if not p.exists():
                return None
            with np.load(p) as z:
                hit = self._memo[p] = {k: z[k] for k in z.files}
        return {k: v.astype(np.float32) for k, v in hit.items()}

    def put(self, sample: Sample, variant: str, taps: dict[str, np.ndarray]) -> None:
        p = self.path(sample, variant)
        buf = io.BytesIO()
        np.savez(buf, **{k: v.astype(np.float16) for k, v in taps.items()})
        write_atomically(p, buf.getvalue())  # two extractions of one sample never share a temp file
