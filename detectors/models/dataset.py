"""Labelled image sets for training and evaluation, and the "re-posted" view.

A set is either a ``manifest.csv`` (columns ``file,label,generator,...``,
label 1 = AI) or a directory with ``real/`` and ``ai/`` (or ``fake/``)
subfolders. Files are read in place.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from collections import defaultdict
from typing import TYPE_CHECKING, Protocol, Sequence

from PIL import Image

if TYPE_CHECKING:
    from detectors.imagedata import DecodeLimits

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".mpo"}
REPOST_MAX_SIDE = 1600
REPOST_QUALITY = 80


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = AI-generated / manipulated, 0 = real
    generator: str | None = None
    category: str | None = None  # e.g. portrait, crowd (train-extra's ``category`` column)


class _Listed(Protocol):
    path: Path
    label: int


def _repeat_row(s: _Listed, first: _Listed) -> dict[str, str]:
    """The report row of ``s``, listed after ``first`` with the same bytes: counted once under one
    label, left out (every copy) under two."""
    if s.label == first.label:
        return {"file": str(s.path), "same_as": str(first.path), "reason": "listed again: counted once"}
    return {"file": str(s.path), "same_as": str(first.path),
            "reason": f"labelled {s.label} here and {first.label} there: every copy left out"}


def once_by_content(samples: Sequence[_Listed],
                    digests: Sequence[str | None]) -> tuple[list[int], list[dict[str, str]]]:
    """Which of ``samples`` to keep (their indexes), each picture once by content (``digests``,
    sha256 of the bytes; None: not read, kept for its reader to report), and a report row
    (``{"file", "same_as", "reason"}``) for each of the rest. A repeat (the same row again,
    another spelling of its path, a copy under another name) was one more row in training and
    one more picture in every metric; the same bytes under both labels cannot be scored either
    way, so every copy is left out."""
    copies: dict[str, list[_Listed]] = defaultdict(list)
    for s, d in zip(samples, digests):
        if d:
            copies[d].append(s)
    kept: list[int] = []
    left: list[dict[str, str]] = []
    for i, (s, d) in enumerate(zip(samples, digests)):
        same = copies[d] if d else [s]
        if same[0] is not s:
            left.append(_repeat_row(s, same[0]))
        elif len({c.label for c in same}) > 1:
            left.append(_repeat_row(s, next(c for c in same if c.label != s.label)))
        else:
            kept.append(i)
    return kept, left


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and line."""


def manifest_rows(manifest: Path) -> list[tuple[dict[str, str], int]]:
    """The rows of ``manifest`` with their ``label`` as 0 or 1. A missing
    ``file``/``label`` column, an empty ``file`` cell, a label other than 0/1
    (``7`` counted as seven AI images in the metrics), a malformed CSV or non
    UTF-8 bytes raise ManifestError naming the line, instead of a KeyError
    traceback or silently wrong numbers."""
    manifest = Path(manifest)
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("file", "label") if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(f"{manifest}: no {' or '.join(missing)} column (header: {reader.fieldnames or 'none'}); "
                                    "a manifest has file,label[,generator,category]")
            out = []
            for row in reader:
                where = f"{manifest}:{reader.line_num}"
                label = (row.get("label") or "").strip()
                if label not in ("0", "1"):
                    raise ManifestError(f"{where}: label {label!r} is not 0 (real) or 1 (AI)")
                if not (row.get("file") or "").strip():
                    raise ManifestError(f"{where}: empty file column")
                out.append((row, int(label)))
            return out
    except csv.Error as e:
        raise ManifestError(f"{manifest}: not a readable CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"{manifest}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_manifest(manifest: Path) -> list[Sample]:
    """Samples of a manifest (see ``manifest_rows``); paths are relative to its folder."""
    base = manifest.parent
    out = []
    for row, label in manifest_rows(manifest):
        gen = (row.get("generator") or "").strip() or None
        out.append(Sample(base / row["file"].strip(), label, gen, (row.get("category") or "").strip() or None))
    return out


def load_labelled(source: Path) -> list[Sample]:
    """Manifest file, directory containing ``manifest.csv``, or ``real/`` + ``ai/``|``fake/``."""
    if source.is_file():
        return load_manifest(source)
    if (source / "manifest.csv").is_file():
        return load_manifest(source / "manifest.csv")
    real = source / "real"
    fakes = [d for d in (source / "ai", source / "fake") if d.is_dir()]
    if not real.is_dir() or not fakes:
        raise FileNotFoundError(f"{source}: no manifest.csv and no real/ + ai/ (or fake/) subfolders")
    samples = [Sample(p, 0) for p in image_files(real)]
    for d in fakes:
        samples += [Sample(p, 1) for p in image_files(d)]
    return samples


def filter_generators(samples: list[Sample], include: str | None = None, exclude: str | None = None) -> list[Sample]:
    """Regex filters on the generator of AI samples; real samples pass untouched."""
    inc = re.compile(include, re.I) if include else None
    exc = re.compile(exclude, re.I) if exclude else None
    out = []
    for s in samples:
        if s.label == 1:
            g = s.generator or ""
            if inc and not inc.search(g):
                continue
            if exc and exc.search(g):
                continue
        out.append(s)
    return out


def stable_fraction(path: Path, frac: float, salt: str = "") -> bool:
    """Deterministic pseudo-random membership (by file name), so a train run and a
    later eval run agree on which real photos were held out."""
    h = hashlib.sha256((salt + path.name).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < frac


def repost_bytes(data: bytes, limits: DecodeLimits | None = None) -> bytes:
    """What a social platform typically serves: metadata stripped, long side
    capped at 1600 px, 4:2:0 JPEG at quality 80. The one re-post of training,
    ``deepwatch eval`` and the pixel probe's features alike.

    Decoded through ``ImageData`` within ``limits`` (default ``DecodeLimits()``),
    as the picture as published is: a file it refuses raises the same
    ``ImageRejected``. A plain Pillow decode took a 657 KB 13000x13000 PNG that
    the published variant refused to 1.6 GB, and the two variants scored
    different sets of pictures."""
    from detectors.imagedata import ImageData

    return repost_rgb(ImageData(data, limits=limits).rgb)


def repost_rgb(img: Image.Image) -> bytes:
    """``repost_bytes`` of decoded, oriented RGB pixels (``img`` is left as it is)."""
    # A view of the same pixels, not a copy: ``thumbnail`` gives the view a new
    # (smaller) core and leaves ``img``'s alone. A copy was one more full-size
    # image outside the decode budget: the pixel model's re-post of an 8800x8800
    # PNG peaked at 762 MiB for a decode counted as 295 MiB.
    img = img._new(img.im)
    # Pillow's JPEG writer falls back on ``info`` for the comment: a source's JPEG/GIF comment
    # (where generator_metadata finds tool names) survived the "stripped" re-post. The view's
    # info is its own copy, so the caller's image keeps its metadata.
    img.info.clear()
    img.thumbnail((REPOST_MAX_SIDE, REPOST_MAX_SIDE), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=REPOST_QUALITY, subsampling="4:2:0")  # no exif/icc/comment passed
    return buf.getvalue()
