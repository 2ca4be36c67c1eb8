"""Helpers shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from streams.ingest import iter_lines


def picture(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A smooth, detailed synthetic picture (a sum of random plane waves):
    different seeds give unrelated pictures with trustworthy PDQ quality."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for _ in range(10):
        fx, fy, ph = rng.uniform(0.5, 10, 2).tolist() + [rng.uniform(0, 6.3)]
        img += rng.uniform(-1, 1, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + ph)[..., None]
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8))


def split_feed(feed: Path, parts: int) -> list[Path]:
    """Cut a JSONL feed into ``parts`` consecutive files beside it."""
    lines = list(iter_lines(feed))
    step = -(-len(lines) // parts)
    out = []
    for i in range(parts):
        p = feed.with_name(f"part{i}.jsonl")
        p.write_bytes(b"\n".join(lines[i * step:(i + 1) * step]) + b"\n")
        out.append(p)
    return out
