"""Helpers shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path

from streams.ingest import iter_lines


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
