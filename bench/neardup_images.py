"""Load a directory tree of images for the near-duplicate bench."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from detectors.imagedata import ImageData, ImageRejected


def load_images(dirs: list[Path], *, max_side: int = 1024, limit: int | None = None) -> list[tuple[str, Image.Image]]:
    """(name, RGB image <= max_side) for every decodable file, one per sha256."""
    seen: set[str] = set()
    out: list[tuple[str, Image.Image]] = []
    for d in dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() not in {".csv", ".md", ".json"}):
            try:
                data = ImageData.from_path(f)
                if data.sha256 in seen:
                    continue
                img = data.rgb.copy()
            except (ImageRejected, OSError):
                continue
            seen.add(data.sha256)
            img.thumbnail((max_side, max_side))  # keeps the bench's own cost down; reposts are rarely bigger
            out.append((str(f.relative_to(d.parent)), img))
            if limit and len(out) >= limit:
                return out
    return out
