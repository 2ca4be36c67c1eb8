"""The IPTC Digital Source Type vocabulary, shared by C2PA and XMP.

Only ``trainedAlgorithmicMedia`` and ``compositeWithTrainedAlgorithmicMedia``
mean generative AI; ``algorithmicMedia`` is non-AI algorithmic content (a
fractal, a chart) and must not raise the score.
"""

from __future__ import annotations

from typing import Iterable, Literal

IPTC_SOURCE_TYPE_BASE = "cv.iptc.org/newscodes/digitalsourcetype/"

AI_CODES = frozenset({"trainedalgorithmicmedia", "compositewithtrainedalgorithmicmedia"})
CAPTURE_CODES = frozenset({"digitalcapture"})

SourceKind = Literal["ai", "capture", "other"]


# The vocabulary's codes are under 40 characters; a file's may be anything.
MAX_CODE_CHARS = 100
# Distinct codes reported in one evidence item: real files declare one. Two XMP
# packets of 2,800 long made-up codes each made the picture's cluster op 3.5 MB,
# over the broker's 1 MB, and the picture a dead letter (too_large).
MAX_CODES = 10


def source_type_code(value: str) -> str | None:
    """The vocabulary code of an IPTC digital source type URI (e.g.
    ``trainedAlgorithmicMedia``, cut to ``MAX_CODE_CHARS``), or None when
    ``value`` is not one."""
    v = value.strip()
    lowered = v.lower()
    for scheme in ("http://", "https://"):
        if lowered.startswith(scheme + IPTC_SOURCE_TYPE_BASE):
            code = v[len(scheme) + len(IPTC_SOURCE_TYPE_BASE) :].strip("/ ")
            return code[:MAX_CODE_CHARS] or None
    return None


def reported_codes(codes: Iterable[str]) -> list[str]:
    """The distinct ``codes``, sorted, the AI ones first, at most ``MAX_CODES``."""
    return sorted(set(codes), key=lambda c: (classify(c) != "ai", c))[:MAX_CODES]


def classify(code: str) -> SourceKind:
    lowered = code.lower()
    if lowered in AI_CODES:
        return "ai"
    if lowered in CAPTURE_CODES:
        return "capture"
    return "other"
