"""Names of image generators as they appear in tool/software metadata fields.

Two levels of trust: a *tool field* (EXIF Software, XMP CreatorTool, a PNG
``Software`` chunk) names the program that wrote the file, so any known
generator name there counts. A *free-text field* (ImageDescription, captions,
comments) is written by people, so only names that cannot plausibly occur in
a caption of a real photo count there ("Firefly" alone would match a caption
about insects; "Adobe Firefly" would not).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Fields longer than this are not tool names; only their start is searched.
MAX_FIELD_CHARS = 4096


@dataclass(frozen=True)
class _Generator:
    name: str
    pattern: re.Pattern[str]
    free_text_ok: bool


def _g(name: str, pattern: str, free_text_ok: bool = True) -> _Generator:
    return _Generator(name, re.compile(pattern, re.IGNORECASE), free_text_ok)


GENERATORS: tuple[_Generator, ...] = (
    _g("DALL·E", r"\bdall[\s\-·•.]?e\b"),
    _g("ChatGPT / OpenAI image generation", r"\b(chatgpt|gpt-image-\d|gpt-4o image)\b"),
    _g("Adobe Firefly", r"\badobe\s+firefly\b"),
    _g("Adobe Firefly", r"^\s*firefly\b", free_text_ok=False),
    _g("Midjourney", r"\b(midjourney|nijijourney)\b"),
    _g("Stable Diffusion", r"\bstable[\s_\-]?diffusion\b"),
    _g("Stability AI DreamStudio", r"\bdreamstudio\b"),
    _g("ComfyUI", r"\bcomfyui\b"),
    _g("AUTOMATIC1111 Stable Diffusion web UI", r"\b(automatic1111|stable-diffusion-webui)\b"),
    _g("InvokeAI", r"\binvoke[\s\-]?ai\b"),
    _g("NovelAI", r"\bnovel\s?ai\b"),
    _g("Fooocus", r"\bfooocus\b"),
    _g("Leonardo.Ai", r"\bleonardo\.ai\b"),
    _g("Ideogram", r"\bideogram(\.ai)?\b", free_text_ok=False),
    _g("Microsoft Designer / Bing Image Creator", r"\b(bing image creator|microsoft designer)\b"),
    _g("Google Imagen", r"\bgoogle imagen\b"),
    _g("FLUX (Black Forest Labs)", r"\b(flux\.1|black forest labs)\b"),
    _g("Kandinsky", r"\bkandinsky[\s\-]?\d", free_text_ok=False),  # the painter shares the name
    _g("Craiyon", r"\bcraiyon\b"),
    _g("NightCafe", r"\bnightcafe\b"),
    _g("Runway", r"\brunway(ml| gen-\d)\b"),
)


def find_generator(text: str, *, free_text: bool) -> str | None:
    """The generator named in ``text``, or None. ``free_text`` selects the
    stricter table for human-written fields."""
    head = text[:MAX_FIELD_CHARS]
    for gen in GENERATORS:
        if free_text and not gen.free_text_ok:
            continue
        if gen.pattern.search(head):
            return gen.name
    return None
