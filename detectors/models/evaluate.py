"""Offline evaluation: metrics per detector, fused, per generator, on the
original files and on a "re-posted" copy of each (metadata stripped, long
side <= 1600 px, JPEG q80), so performance without provenance metadata is
always reported next to performance with it.

Output (stable; ``schema`` bumps on any incompatible change)::

    {
      "schema": 1,
      "dataset": "<path>",
      "n": 247, "n_pos": 93, "n_neg": 154,
      "models": {"model:NAME": {"arch", "version", "threshold", "calibration"}},
      "skipped": [{"file": ..., "reason": ...}],   # unreadable, or not decodable ("<variant>: ...")
      "duplicates": [{"file", "same_as", "reason"}],  # same bytes again: scored once; under both labels: left out
      "detector_errors": [{"file", "detector", "reason", "variant"}],  # scored as no opinion there
      "excluded_trained": 0,              # left out by --exclude-trained
      "trained_overlap": 0,               # kept files some learned detector was trained on
      "variants": {
        "original": {
          "detectors": {"<detector name>": METRICS, ...},
          "fused": METRICS | null,            # null when detectors.fusion is unavailable
          "per_generator": {"<generator>": {"<detector name>|fused": METRICS, ...}}
        },
        "reposted": { same shape }
      }
    }

    METRICS = {auc, average_precision, tpr_at_1pct_fpr, tpr_at_5pct_fpr,
               accuracy, recall, fpr, real_above_0.5, threshold, n_pos, n_neg, coverage}

Each variant also has ``per_category`` (shape of ``per_generator``) when the
manifest has a ``category`` column: that category's pictures, both classes,
so a real-only category shows its false-positive rate (``fpr``) and the share
of its real pictures scored >= 0.5 (``real_above_0.5``: a desk reads 0.5 as
"leans AI"; no opinion never counts).
"original" is the file as published.
Top-level ``n`` counts distinct readable files; each variant's ``n`` those that decoded in it
(the others are in ``skipped`` with the variant named). A file listed twice (same bytes) is
scored once; the same bytes under both labels are left out, every copy (``duplicates`` names them).

``tpr_at_1pct_fpr``/``tpr_at_5pct_fpr``: the largest share of AI pictures flagged at a
threshold that flags at most floor(1% (5%) x n_neg) real pictures, counting score >= threshold:
the ``fpr <= 1%`` point of ``sklearn.metrics.roc_curve``, not interpolated. Ties at the cut go
against the detector, and with fewer than 100 (20) real pictures it is the TPR at zero false
positives. Every group reports ``n_pos``/``n_neg``: with a handful of pictures one picture moves
a rate by 1/n, so read a group's numbers with its counts.

``auc``/``average_precision`` are null when only one class is present.
A cheap detector that returns no evidence for an image has no opinion: it is
scored 0.5 there for AUC/AP, never counts as flagged for accuracy/recall/fpr,
and ``coverage`` is the fraction of images it spoke on.
``per_generator`` compares one generator's AI images against *all* real images.
``fused`` is ``detectors.fusion.fuse`` over all evidence for the image, with
fusion's "likely-ai" cut (0.7) as threshold; its ``coverage`` is the fraction
of images with any evidence at all.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np

from detectors.base import Detector, Evidence
from detectors.imagedata import ImageData
from detectors.fusion import LIKELY_AI, fuse
from detectors.models.dataset import Sample, once_by_content, repost_bytes
from detectors.models.pixel_metrics import ranking

log = logging.getLogger(__name__)

SCHEMA = 1
NO_OPINION = 0.5
DEFAULT_THRESHOLD = 0.5
VARIANTS = ("original", "reposted")


def metrics(scores: np.ndarray, labels: np.ndarray, threshold: float, covered: np.ndarray | None = None) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score

    y = labels.astype(int)
    pred = scores >= threshold
    leans = scores >= 0.5
    if covered is not None:
        pred &= covered  # no opinion never counts as a flag, whatever the threshold
        leans &= covered
    pred = pred.astype(int)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    ranked = ranking(y, scores)
    return {
        "auc": _rounded(ranked["auc"]),
        "average_precision": _rounded(ranked["ap"]),
        "tpr_at_1pct_fpr": _rounded(ranked["tpr_at_1pct_fpr"]),
        "tpr_at_5pct_fpr": _rounded(ranked["tpr_at_5pct_fpr"]),
        "accuracy": round(float(accuracy_score(y, pred)), 4) if len(y) else None,
        "recall": round(float(pred[y == 1].mean()), 4) if n_pos else None,
        "fpr": round(float(pred[y == 0].mean()), 4) if n_neg else None,
        "real_above_0.5": round(float(leans[y == 0].mean()), 4) if n_neg else None,
        "threshold": threshold,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "coverage": round(float(covered.mean()), 4) if covered is not None and len(covered) else 1.0,
    }


def _rounded(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _describe(d: Detector) -> dict[str, Any] | None:
    describe = getattr(d, "describe", None)
    if describe is not None:
        return describe()
    card = getattr(d, "card", None)
    if card is None:
        return None
    return {"arch": card.arch, "version": card.version, "threshold": card.threshold, "calibration": card.calibration.method}


def _threshold(det: Detector) -> float:
    card = getattr(det, "card", None)
    return float(card.threshold) if card is not None else float(getattr(det, "threshold", DEFAULT_THRESHOLD))


def _run_detectors(detectors: list[Detector], images: list[ImageData], batch: int,
                   errors: list[dict[str, str]] | None = None) -> list[list[Evidence]]:
    """Evidence per image from every detector (batched for model detectors). A detector that
    raises on an image has no opinion there; each such failure is appended to ``errors``
    (file, detector, reason), so the report says which pictures a detector could not score."""
    out: list[list[Evidence]] = [[] for _ in images]

    def failed(det: Detector, im: ImageData, e: Exception) -> None:
        log.warning("%s failed on %s: %s", det.name, im.path, e)
        if errors is not None:
            errors.append({"file": str(im.path), "detector": det.name, "reason": str(e)})

    for det in detectors:
        predict = getattr(det, "predict_batch", None)
        if predict is not None:
            for i in range(0, len(images), batch):
                chunk = images[i : i + batch]
                try:
                    evs = predict(chunk)
                except Exception as e:  # noqa: BLE001  fall back per image, so one bad file doesn't sink the run
                    log.warning("%s batch failed (%s); retrying per image", det.name, e)
                    evs = []
                    for im in chunk:
                        try:
                            evs += predict([im])
                        except Exception as e2:  # noqa: BLE001
                            failed(det, im, e2)
                by_sha: dict[str, list[Evidence]] = defaultdict(list)
                for ev in evs:
                    by_sha[ev.sha256 or ""].append(ev)
                for j, im in enumerate(chunk):
                    out[i + j] += by_sha.get(im.sha256, [])
        else:
            for j, im in enumerate(images):
                try:
                    out[j] += det.analyze(im)
                except Exception as e:  # noqa: BLE001
                    failed(det, im, e)
    return out


def _variant_report(
    detectors: list[Detector],
    evidence: list[list[Evidence]],
    labels: np.ndarray,
    generators: list[str | None],
    categories: list[str | None] | None = None,
) -> dict[str, Any]:
    scores: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for det in detectors:
        s = np.full(len(labels), NO_OPINION)
        cov = np.zeros(len(labels), dtype=bool)
        for i, evs in enumerate(evidence):
            mine = [e.score for e in evs if e.detector == det.name]
            if mine:
                s[i], cov[i] = max(mine), True  # several findings: the strongest AI claim counts
        scores[det.name] = (s, cov, _threshold(det))
    # fuse([]) is fusion's own "nothing to go on" prior, not 0.5; flagged at
    # the alerting operating point ("likely-ai")
    fused = np.array([float(fuse(evs).score) for evs in evidence])
    scores["fused"] = (fused, np.array([bool(evs) for evs in evidence]), LIKELY_AI)

    report: dict[str, Any] = {
        "detectors": {k: metrics(s, labels, t, c) for k, (s, c, t) in scores.items() if k != "fused"},
        "fused": metrics(*_pick(scores["fused"], labels)),
        "per_generator": {},
        "per_category": {},
    }
    gens = sorted({g for g, y in zip(generators, labels) if y == 1 and g})
    neg = labels == 0
    for g in gens:
        mask = neg | np.array([gg == g for gg in generators])
        report["per_generator"][g] = {
            k: metrics(s[mask], labels[mask], t, c[mask]) for k, (s, c, t) in scores.items()
        }
    for c in sorted({c for c in categories or [] if c}):
        mask = np.array([cc == c for cc in categories])
        report["per_category"][c] = {
            k: metrics(s[mask], labels[mask], t, c_[mask]) for k, (s, c_, t) in scores.items()
        }
    return report


def _pick(entry: tuple[np.ndarray, np.ndarray, float], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    s, c, t = entry
    return s, labels, t, c


def evaluate(
    samples: list[Sample],
    detectors: list[Detector],
    *,
    dataset: str,
    batch: int = 16,
    variants: Iterable[str] = VARIANTS,
    exclude_sha256: set[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    import hashlib

    skipped: list[dict[str, str]] = []
    kept: list[tuple[Sample, bytes]] = []
    excluded = overlap = 0
    # Files a learned detector was trained or calibrated on, kept in the set: counted, so the
    # report can say its numbers are optimistic (a head scored AUC 1.0 on its own training set).
    trained: set[str] = set().union(*(getattr(d, "trained_files", frozenset()) for d in detectors))
    # A picture listed twice (the same row again, another spelling of its path, a copy under
    # another name) was scored and counted twice: its class weighed double in every metric.
    # The same bytes under both labels cannot be scored either way: every copy goes.
    read: list[tuple[Sample, bytes, str]] = []
    for s in samples:
        try:
            data = s.path.read_bytes()
        except OSError as e:
            skipped.append({"file": str(s.path), "reason": f"unreadable: {e}"})
            continue
        read.append((s, data, hashlib.sha256(data).hexdigest()))
    once, duplicates = once_by_content([s for s, _, _ in read], [d for _, _, d in read])
    for s, data, digest in (read[i] for i in once):
        if exclude_sha256 and digest in exclude_sha256:
            excluded += 1
            continue
        overlap += digest in trained
        kept.append((s, data))
    if not kept:
        raise ValueError(f"nothing left to evaluate: {excluded} file(s) excluded as training data (--exclude-trained), "
                         f"{len(skipped)} unreadable")

    labels = np.array([s.label for s, _ in kept])
    generators = [s.generator for s, _ in kept]
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "dataset": dataset,
        "n": len(kept),
        "n_pos": int(labels.sum()) if len(labels) else 0,
        "n_neg": int(len(labels) - labels.sum()) if len(labels) else 0,
        "models": {d.name: _describe(d) for d in detectors if _describe(d) is not None},
        "skipped": skipped,
        "duplicates": duplicates,
        "detector_errors": [],
        "excluded_trained": excluded,
        "trained_overlap": overlap,
        "variants": {},
    }
    for variant in variants:
        evidence: list[list[Evidence]] = []
        valid: list[int] = []
        # Chunked so decoded full-resolution pixels (ImageData caches them)
        # are released after each chunk: camera photos are ~20 MB each as RGB.
        for start in range(0, len(kept), batch):
            chunk: list[ImageData] = []
            for k in range(start, min(start + batch, len(kept))):
                s, data = kept[k]
                try:
                    raw = data if variant == "original" else repost_bytes(data)
                    chunk.append(ImageData(raw, path=str(s.path)))
                    valid.append(k)
                except Exception as e:  # noqa: BLE001  Pillow raises assorted errors on odd files
                    skipped.append({"file": str(s.path), "reason": f"{variant}: {e}"})
            errors: list[dict[str, str]] = []
            evidence += _run_detectors(detectors, chunk, batch, errors)
            result["detector_errors"] += [{**e, "variant": variant} for e in errors]
            if progress:
                progress(variant, min(start + batch, len(kept)), len(kept))
        report = _variant_report(detectors, evidence, labels[valid], [generators[i] for i in valid],
                                 [kept[i][0].category for i in valid])
        result["variants"][variant] = {"n": len(valid), **report}
    return result
