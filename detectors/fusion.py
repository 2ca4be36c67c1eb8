"""Fuse a cluster's evidence into one fake score and a verdict.

Rules, in order:

1. **Direction of bank matches.** Evidence of kind ``bank`` says which way it points in ``data["verdict"]``: ``"authentic"`` always
   counts against AI, ``"fake"`` always for it. If its score disagrees with
   its verdict, the verdict wins and the score becomes 0.05 / 0.95.
2. **One vote per detector.** A cluster is many copies of one picture, so
   the same detector's evidence from several member images counts once: the
   item with the largest |contribution| (below) is kept, the rest dropped.
   Ten identical reposts are not ten times the evidence.
3. **Weighted log-odds.** Each kept item contributes
   ``weight * logit(clip(score, 0.01, 0.99))``; the fused score is the
   logistic of the sum (starting from even odds). Clipping bounds any single
   item's say, so weight, not a score of 0.9999, decides how decisive it is.
4. **Provenance dominates models.** When a non-model item is *decisive*
   (weight >= 2 and score <= 0.1 or >= 0.9: a C2PA AI source type, a
   generator chunk, a signed camera capture, a bank match), learned pixel
   classifiers (kind ``model`` or ``vendor``) contribute at a quarter of their weight.
   So does a learned item that points the other way from a non-model item of
   weight >= 1 (a generator named in free text is not undone by a pixel model
   that did not see it). Otherwise models count with their own weight like
   anything else.
5. **Verdict.** score >= ``likely_ai`` -> ``likely-ai``; >= ``inconclusive``
   -> ``inconclusive``; otherwise ``no-evidence`` (no evidence *of AI*:
   evidence pointing at authenticity also lands here, with a low score).
6. **Nothing to go on.** With no item that carries weight and an opinion,
   the verdict is ``no-evidence`` and the score is ``NO_EVIDENCE_SCORE`` =
   0.2: a prior below any sensible alert threshold (alerts default to 0.7,
   ``inconclusive`` to 0.4), so an unanalysable cluster never alerts, yet
   above 0 because stripped metadata is not proof of authenticity.

Returned evidence is the kept items (one per detector), most decisive first.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from detectors.base import Evidence, EvidenceKind

Verdict = Literal["likely-ai", "inconclusive", "no-evidence"]

NO_EVIDENCE_SCORE = 0.2
SCORE_CLIP = 0.01
DECISIVE_WEIGHT = 2.0
DECISIVE_SCORE = 0.9
MODEL_DAMPING = 0.25
CONTRADICTED_BY_WEIGHT = 1.0
_BANK_DEFAULT = {"authentic": 0.05, "fake": 0.95}


class Fused(BaseModel):
    score: float = Field(ge=0.0, le=1.0)
    verdict: Verdict
    evidence: list[Evidence]


def _logit(p: float) -> float:
    p = min(max(p, SCORE_CLIP), 1.0 - SCORE_CLIP)
    return math.log(p / (1.0 - p))


def effective_score(ev: Evidence) -> float:
    """The score fusion uses: a bank match's verdict fixes its direction."""
    if ev.kind != EvidenceKind.BANK:
        return ev.score
    verdict = ev.data.get("verdict")
    if verdict == "authentic":
        return ev.score if ev.score < 0.5 else _BANK_DEFAULT["authentic"]
    if verdict == "fake":
        return ev.score if ev.score > 0.5 else _BANK_DEFAULT["fake"]
    return ev.score


def contribution(ev: Evidence) -> float:
    """Undamped log-odds contribution of one item."""
    return ev.weight * _logit(effective_score(ev))


def _is_model(ev: Evidence) -> bool:
    return ev.kind.learned


def _is_decisive(ev: Evidence) -> bool:
    s = effective_score(ev)
    return not _is_model(ev) and ev.weight >= DECISIVE_WEIGHT and (s >= DECISIVE_SCORE or s <= 1 - DECISIVE_SCORE)


def strongest_per_detector(evidence: list[Evidence]) -> list[Evidence]:
    best: dict[str, Evidence] = {}
    for ev in evidence:
        kept = best.get(ev.detector)
        if kept is None or abs(contribution(ev)) > abs(contribution(kept)):
            best[ev.detector] = ev
    return list(best.values())


LIKELY_AI = 0.7
INCONCLUSIVE = 0.4


def fuse(evidence: list[Evidence], *, likely_ai: float = LIKELY_AI, inconclusive: float = INCONCLUSIVE) -> Fused:
    """Combine evidence from all member images of a cluster (see module doc)."""
    kept = strongest_per_detector(evidence)
    decisive = any(_is_decisive(ev) for ev in kept)
    # The directions (+1 AI, -1 authentic) that non-model items of some weight point in.
    held = {math.copysign(1.0, contribution(ev)) for ev in kept
            if not _is_model(ev) and ev.weight >= CONTRADICTED_BY_WEIGHT and contribution(ev) != 0.0}

    def weighted(ev: Evidence) -> float:
        c = contribution(ev)
        if _is_model(ev) and (decisive or (c != 0.0 and -math.copysign(1.0, c) in held)):
            return c * MODEL_DAMPING
        return c

    kept.sort(key=lambda ev: abs(weighted(ev)), reverse=True)
    if not any(weighted(ev) != 0.0 for ev in kept):
        return Fused(score=NO_EVIDENCE_SCORE, verdict="no-evidence", evidence=kept)

    total = sum(weighted(ev) for ev in kept)
    score = 1.0 / (1.0 + math.exp(-max(min(total, 700.0), -700.0)))
    if score >= likely_ai:
        verdict: Verdict = "likely-ai"
    elif score >= inconclusive:
        verdict = "inconclusive"
    else:
        verdict = "no-evidence"
    return Fused(score=score, verdict=verdict, evidence=kept)
