"""The IPTC Digital Source Type vocabulary, shared by C2PA and XMP.

Only ``trainedAlgorithmicMedia`` and ``compositeWithTrainedAlgorithmicMedia``
mean generative AI; ``algorithmicMedia`` is non-AI algorithmic content (a
fractal, a chart) and must not raise the score.
"""

from __future__ import annotations

from typing import Literal

IPTC_SOURCE_TYPE_BASE = "cv.iptc.org/newscodes/digitalsourcetype/"

AI_CODES = frozenset({"trainedalgorithmicmedia", "compositewithtrainedalgorithmicmedia"})
CAPTURE_CODES = frozenset({"digitalcapture"})

SourceKind = Literal["ai", "capture", "other"]


def source_type_code(value: str) -> str | None:
    """The vocabulary code of an IPTC digital source type URI (e.g.
    ``trainedAlgorithmicMedia``), or None when ``value`` is not one."""
    v = value.strip()
    lowered = v.lower()
    for scheme in ("http://", "https://"):
        if lowered.startswith(scheme + IPTC_SOURCE_TYPE_BASE):
            code = v[len(scheme) + len(IPTC_SOURCE_TYPE_BASE) :].strip("/ ")
            return code or None
    return None


def classify(code: str) -> SourceKind:
    lowered = code.lower()
    if lowered in AI_CODES:
        return "ai"
    if lowered in CAPTURE_CODES:
        return "capture"
    return "other"
