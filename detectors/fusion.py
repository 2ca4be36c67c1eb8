"""Fuse a cluster's evidence into one fake score and a verdict.

Rules, in order:

1. **Direction of bank matches.** Evidence of kind ``bank`` says which way it points in ``data["verdict"]``: ``"authentic"`` always
   counts against AI, ``"fake"`` always for it. If its score disagrees with
   its verdict, the verdict wins and the score becomes 0.05 / 0.95.
2. **One vote per detector.** A cluster is many copies of one picture, so
   the same detector's evidence from several member images counts once: the
   item with the largest |contribution| (below) is kept, the rest dropped.
   Ten identical reposts are not ten times the evidence. An exact tie is
   broken by the item itself (larger weight, then higher effective score,
   higher score, then detail, sha256, kind, data), never by list order:
   scores 0.75 and 0.25 at one weight kept whichever came first, so a merged
   cluster's verdict depended on which side of the merge survived.
3. **Weighted log-odds.** Each kept item contributes
   ``weight * logit(clip(score, 0.01, 0.99))``; the fused score is the
   logistic of the sum (starting from even odds). Clipping bounds any single
   item's say, so weight, not a score of 0.9999, decides how decisive it is.
   A contribution is bounded to +-``MAX_CONTRIBUTION`` (a weight past ~150
   saturates the logistic anyway), so huge weights cannot overflow the sum
   into inf - inf = NaN; opposing ones cancel to even odds.
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

Returned evidence is the kept items (one per detector), most decisive first
(then by detector name). Fusion is a function of the set of items, not of
their order. ``Evidence`` refuses non-finite scores and weights and negative
weights; an item that bypassed validation with one (``model_construct``, an
assignment) is ignored, so callers of ``fuse`` outside the cluster engine
(the desk's source view, ``deepwatch detect``) never get NaN or an error.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from detectors.base import Evidence, EvidenceKind

Verdict = Literal["likely-ai", "inconclusive", "no-evidence"]

NO_EVIDENCE_SCORE = 0.2
SCORE_CLIP = 0.01
DECISIVE_WEIGHT = 2.0
DECISIVE_SCORE = 0.9
MODEL_DAMPING = 0.25
CONTRADICTED_BY_WEIGHT = 1.0
MAX_CONTRIBUTION = 700.0  # log-odds: math.exp(700) is finite, and the logistic is 0 or 1 well before
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
    """Undamped log-odds contribution of one item, within +-MAX_CONTRIBUTION."""
    return max(-MAX_CONTRIBUTION, min(ev.weight * _logit(effective_score(ev)), MAX_CONTRIBUTION))


def _usable(ev: Evidence) -> bool:
    """A finite score in [0, 1] and a finite weight >= 0, as ``Evidence``
    validates them; False only for an item that bypassed validation."""
    return (isinstance(ev.score, (int, float)) and isinstance(ev.weight, (int, float))
            and 0.0 <= ev.score <= 1.0 and 0.0 <= ev.weight < math.inf)  # NaN fails every comparison


def _rank(ev: Evidence) -> tuple[Any, ...]:
    """Which of one detector's items is kept: the largest |contribution|,
    then the rest of the item, so that exact ties do not go by list order."""
    return (abs(contribution(ev)), ev.weight, effective_score(ev), ev.score, ev.detail, ev.sha256 or "",
            ev.kind.value)


def _data_key(ev: Evidence) -> str:
    return json.dumps(ev.data, sort_keys=True, default=repr)


def _is_model(ev: Evidence) -> bool:
    return ev.kind.learned


def _is_decisive(ev: Evidence) -> bool:
    s = effective_score(ev)
    return not _is_model(ev) and ev.weight >= DECISIVE_WEIGHT and (s >= DECISIVE_SCORE or s <= 1 - DECISIVE_SCORE)


def strongest_per_detector(evidence: list[Evidence]) -> list[Evidence]:
    """One item per detector (rule 2), whatever the order of ``evidence``;
    items that are not finite numbers are left out."""
    best: dict[str, tuple[tuple[Any, ...], Evidence]] = {}
    for ev in evidence:
        if not _usable(ev):
            continue
        rank = _rank(ev)
        kept = best.get(ev.detector)
        if kept is None or rank > kept[0] or (rank == kept[0] and _data_key(ev) > _data_key(kept[1])):
            best[ev.detector] = (rank, ev)
    return [ev for _, ev in best.values()]


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

    # detector names are unique among the kept items: a total order, so the
    # sum below adds the same floats in the same order whatever the input's
    kept.sort(key=lambda ev: (-abs(weighted(ev)), ev.detector))
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
