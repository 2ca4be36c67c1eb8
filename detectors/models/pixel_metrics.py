"""Detection metrics: AUC, AP, TPR at fixed FPR, per generator and per category."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


class Labelled(Protocol):
    label: int
    generator: str
    category: str


def threshold_for_fpr(real_scores: np.ndarray, max_fpr: float) -> float:
    """Smallest threshold t with (real scores >= t) / n <= max_fpr."""
    s = np.sort(np.asarray(real_scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        return 0.5
    allowed = int(np.floor(max_fpr * len(s)))  # this many reals may be at/above t
    if allowed >= len(s):
        return float(s[-1])
    # just above the (allowed+1)-th highest real score
    return float(np.nextafter(s[allowed], np.inf))


def tpr_at_fpr(y: np.ndarray, p: np.ndarray, fpr: float) -> float | None:
    y, p = np.asarray(y), np.asarray(p)
    if (y == 0).sum() == 0 or (y == 1).sum() == 0:
        return None
    t = threshold_for_fpr(p[y == 0], fpr)
    return float((p[y == 1] >= t).mean())


def ranking(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """The metrics of how scores rank AI (1) above real (0), whatever the
    threshold: AUC, average precision and TPR at 1% and 5% FPR; None where
    one class is missing. ``summary`` and ``evaluate.metrics`` report them."""
    y, p = np.asarray(y), np.asarray(p)
    both = 0 < y.sum() < len(y)
    return {
        "auc": float(roc_auc_score(y, p)) if both else None,
        "ap": float(average_precision_score(y, p)) if both else None,
        "tpr_at_1pct_fpr": tpr_at_fpr(y, p, 0.01),
        "tpr_at_5pct_fpr": tpr_at_fpr(y, p, 0.05),
    }


def summary(y: np.ndarray, p: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    y, p = np.asarray(y), np.asarray(p)
    out: dict[str, Any] = {"n": int(len(y)), "n_ai": int(y.sum()), "n_real": int((y == 0).sum()), **ranking(y, p)}
    if threshold is not None:
        if (y == 1).any():
            out["tpr_at_threshold"] = float((p[y == 1] >= threshold).mean())
        if (y == 0).any():
            out["fpr_at_threshold"] = float((p[y == 0] >= threshold).mean())
            out["real_above_0.5"] = float((p[y == 0] >= 0.5).mean())
    return out


def report(y: np.ndarray, p: np.ndarray, samples: list[Labelled], *, threshold: float | None = None) -> dict[str, Any]:
    """Overall, per generator (its AI pictures against ALL real photos) and per category."""
    y, p = np.asarray(y), np.asarray(p)
    real = y == 0
    per_gen: dict[str, list[int]] = defaultdict(list)
    per_cat: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.label:
            per_gen[s.generator].append(i)
        per_cat[s.category].append(i)
    generators = {}
    for g, idx in sorted(per_gen.items()):
        sel = np.zeros(len(y), bool)
        sel[idx] = True
        sel |= real
        generators[g] = summary(y[sel], p[sel], threshold)
    categories = {c: summary(y[idx], p[idx], threshold) for c, idx in sorted(per_cat.items())}
    return {"overall": summary(y, p, threshold), "generators": generators, "categories": categories}
