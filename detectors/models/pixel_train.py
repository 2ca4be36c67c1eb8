"""Train and judge the pixel probe by leave-generator-out cross-validation.

Every choice (crops, taps, regularisation, weighting) is judged on folds that
hold out whole generator families (and whole real-photo sources), never on a
random split: a random split lets the probe recognise a generator it has seen
siblings of, which says nothing about the next generator.

Training rows are the *re-posted* and *augmented* variants of the training
folds (both classes re-encoded alike); the held-out fold is scored as
re-posted and as published. Out-of-fold scores then give the calibration
(Platt, fitted on held-out folds only, its probabilities stated for the AI
share at which about 3% of real photos reach 0.5), the operating threshold
(<= 1% false positives on real photos, portraits included) and the reported
metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from detectors.model_names import DEFAULT_PIXEL_MODEL
from detectors.models.calibration import fit_calibration
from detectors.models.pixel_backbone import FeatureSpec
from detectors.models.pixel_data import FeatureCache, Sample
from detectors.models.pixel_features import matrix
from detectors.models.pixel_metrics import report, threshold_for_fpr

log = logging.getLogger(__name__)

PEOPLE = {"portrait", "people", "crowd"}
EVAL_VARIANTS = ("reposted", "published")


@dataclass
class ProbeParams:
    C: float = 0.01
    # "class": balance AI vs real; "class+people": also balance people/other within each class
    weighting: str = "class+people"
    # Re-posted rows only: adding random re-encodings (aug0/aug1) measured slightly
    # WORSE leave-generator-out (AUC 0.835 -> 0.816, docs/pixel-detector.md).
    train_variants: tuple[str, ...] = ("reposted",)
    folds: int = 10
    seed: int = 0
    hidden: int = 64  # 0 = linear head; N = one ReLU hidden layer of N units (measured better, docs)
    alpha: float = 1.0  # MLP L2 strength


@dataclass
class CvResult:
    oof: dict[str, np.ndarray]  # variant -> out-of-fold logits (nan where missing)
    present: dict[str, np.ndarray]
    fold_of: np.ndarray
    metrics: dict = field(default_factory=dict)


def sample_weights(samples: list[Sample], weighting: str) -> np.ndarray:
    y = np.array([s.label for s in samples])
    cells = [(s.label, s.category in PEOPLE) if weighting == "class+people" else (s.label,) for s in samples]
    counts: dict[tuple, int] = {}
    for c in cells:
        counts[c] = counts.get(c, 0) + 1
    n_cells_per_class = {lab: len({c for c in counts if c[0] == lab}) for lab in (0, 1)}
    w = np.array([1.0 / (counts[c] * n_cells_per_class[c[0]]) for c in cells])
    # each class sums to len/2
    for lab in (0, 1):
        m = y == lab
        if m.any():
            w[m] *= (len(y) / 2) / w[m].sum()
    return w


@dataclass
class HeadWeights:
    """Head parameters with the standardiser folded in (see ``PixelHead``)."""

    w: np.ndarray
    b: float
    W1: np.ndarray | None = None
    b1: np.ndarray | None = None

    def logits(self, X: np.ndarray) -> np.ndarray:
        if self.W1 is not None:
            X = np.maximum(X @ self.W1 + self.b1, 0.0)
        return X @ self.w + self.b


def _fit(X: np.ndarray, y: np.ndarray, w: np.ndarray, params: "ProbeParams") -> HeadWeights:
    """Standardise, then L2 logistic regression (``hidden == 0``) or a one-hidden-layer
    ReLU MLP; the standardiser is folded into the (first) layer."""
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    if params.hidden == 0:
        lr = LogisticRegression(C=params.C, max_iter=3000, random_state=params.seed)
        lr.fit(Z, y, sample_weight=w)
        coef = lr.coef_[0] / scaler.scale_
        return HeadWeights(coef, float(lr.intercept_[0] - coef @ scaler.mean_))
    from sklearn.neural_network import MLPClassifier

    mlp = MLPClassifier((params.hidden,), alpha=params.alpha, max_iter=300, random_state=params.seed)
    mlp.fit(Z, y, sample_weight=w)
    W1 = mlp.coefs_[0] / scaler.scale_[:, None]
    b1 = mlp.intercepts_[0] - scaler.mean_ @ W1
    return HeadWeights(mlp.coefs_[1][:, 0], float(mlp.intercepts_[1][0]), W1, b1)


def _rows(samples: list[Sample], idx: np.ndarray, variants, cache, spec, weighting):
    Xs, ys, ws = [], [], []
    base_w = sample_weights([samples[i] for i in idx], weighting)
    for v in variants:
        X, present = matrix([samples[i] for i in idx], v, cache, spec)
        Xs.append(X[present])
        ys.append(np.array([samples[i].label for i in idx])[present])
        ws.append(base_w[present])
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(ws)


def fit_head(samples: list[Sample], cache: FeatureCache, spec: FeatureSpec, params: ProbeParams) -> HeadWeights:
    idx = np.arange(len(samples))
    X, y, w = _rows(samples, idx, params.train_variants, cache, spec, params.weighting)
    return _fit(X, y, w, params)


def unique_samples(samples: list[Sample]) -> tuple[list[Sample], list[dict[str, str]]]:
    """``samples`` with each picture once (by content: the same row twice, another spelling of
    its path, a copy under another name), and the rest as ``{"file", "same_as", "reason"}``.
    A repeat was one more row in training and one more picture in every metric, and a copy in
    another group could sit in a training fold while its twin is tested. The same bytes under
    both labels cannot be scored either way: every copy is left out and listed. Unreadable
    files are kept: ``extract`` reports them."""
    from detectors.models.dataset import once_by_content
    from detectors.models.pixel_data import file_sha256

    kept, left = once_by_content(samples, [file_sha256(s.path) for s in samples])
    return [samples[i] for i in kept], left


def skipped_rows(skipped: list[tuple[Sample, str, str]]) -> list[dict[str, str]]:
    """``extract``'s skipped (sample, variant, reason) as report rows: those pictures are in no metric."""
    return [{"file": str(s.path), "variant": v, "reason": r} for s, v, r in skipped]


def cross_validate(samples: list[Sample], cache: FeatureCache, spec: FeatureSpec, params: ProbeParams) -> CvResult:
    """Out-of-fold logits with generator families (and real sources) held out together.

    Raises ValueError when a fold's training part lacks AI or real pictures: with all real
    photos in one group (a manifest without ``repo``/``source``), one fold trained on AI
    pictures alone, and the MLP head fitted a single class without a word, scoring that
    fold's real photos with a head that had never seen one."""
    groups = np.array([s.group for s in samples])
    y = np.array([s.label for s in samples])
    # Shuffle group order by seed so fold membership does not follow manifest order.
    rng = np.random.default_rng(params.seed)
    uniq = np.unique(groups)
    perm = dict(zip(uniq, rng.permutation(len(uniq))))
    gkf = GroupKFold(n_splits=min(params.folds, len(uniq)))
    fold_of = np.full(len(samples), -1)
    feats = {v: matrix(samples, v, cache, spec) for v in EVAL_VARIANTS}
    oof = {v: np.full(len(samples), np.nan) for v in EVAL_VARIANTS}
    for k, (tr, te) in enumerate(gkf.split(np.zeros(len(samples)), y, [perm[g] for g in groups])):
        fold_of[te] = k
        if len(np.unique(y[tr])) < 2:
            missing = "real" if (y[tr] == 1).all() else "AI"
            held = sorted({g for g in groups[te] if g.startswith("real:" if missing == "real" else "ai:")})
            raise ValueError(
                f"leave-generator-out fold {k + 1} would train with no {missing} pictures: every one is in "
                f"the held-out group(s) {', '.join(held)}; give {missing} pictures from at least two "
                + ("sources (a repo or source column naming where each real photo came from)" if missing == "real"
                   else "generators (a generator column)"))
        X, yy, w = _rows(samples, tr, params.train_variants, cache, spec, params.weighting)
        hw = _fit(X, yy, w, params)
        for v, (Xv, present) in feats.items():
            sel = te[present[te]]
            oof[v][sel] = hw.logits(Xv[sel])
    return CvResult(oof=oof, present={v: feats[v][1] for v in EVAL_VARIANTS}, fold_of=fold_of)


# Where a probability of 0.5 sits: about this share of real photos (and of real portraits,
# people and crowds alone) score at or above it out of fold (an interpolated percentile). A desk reads 0.5 as "leans AI",
# and a news stream is mostly real photos, most of them of people (docs/pixel-detector.md).
LEAN_FPR = 0.03


def _fpr_point(samples: list[Sample], cv: CvResult, cal, max_fpr: float, *, percentile: bool = False) -> float:
    """The calibrated score at or above which <= ``max_fpr`` of the real photos score, and of the
    real portraits/people alone, as published and re-posted: the largest of those four points.
    ``percentile``: the (1 - max_fpr) percentile, interpolated, instead of the strict count (on 127
    portraits, "3%" would otherwise allow 3 pictures: 2.4%)."""
    y = np.array([s.label for s in samples])
    people = np.array([s.category in PEOPLE for s in samples])
    candidates = []
    for v in EVAL_VARIANTS:
        p = cal.apply(np.nan_to_num(cv.oof[v], nan=-50.0))
        real = (y == 0) & ~np.isnan(cv.oof[v])
        for m in (real, real & people):
            if m is real or m.sum() >= 20:
                candidates.append(np.quantile(p[m], 1 - max_fpr) if percentile else threshold_for_fpr(p[m], max_fpr))
    return float(max(candidates))


def calibrate_and_threshold(samples: list[Sample], cv: CvResult, max_fpr: float = 0.01, lean_fpr: float = LEAN_FPR):
    """Platt calibration on out-of-fold re-posted logits, stated for the AI share that puts 0.5
    at the (1 - ``lean_fpr``) percentile of real photos' scores; then the calibrated threshold that keeps false
    positives <= ``max_fpr`` on all real photos AND on real portraits/people alone (as published
    and re-posted). Restating moves no ranking: the flagged set is the one the fitted calibration
    would flag at the same false-positive rate."""
    y = np.array([s.label for s in samples])
    z = cv.oof["reposted"]
    ok = ~np.isnan(z)
    cal = fit_calibration(z[ok], y[ok], method="platt")
    if cal.share is not None:
        lean = min(max(_fpr_point(samples, cv, cal, lean_fpr, percentile=True), 1e-6), 1 - 1e-6)
        # Bayes: the prior whose odds are the fitted share's odds divided by the lean point's.
        odds = cal.share / (1 - cal.share) * (1 - lean) / lean
        cal = cal.restated(odds / (1 + odds))
    return cal, _fpr_point(samples, cv, cal, max_fpr)


def cv_report(samples: list[Sample], cv: CvResult, cal, threshold: float) -> dict:
    y = np.array([s.label for s in samples])
    out = {}
    for v in EVAL_VARIANTS:
        ok = ~np.isnan(cv.oof[v])
        p = cal.apply(cv.oof[v][ok])
        out[v] = report(
            y[ok], p, [samples[i] for i in np.flatnonzero(ok)], threshold=threshold,
        )
    return out


def prior_report(samples: list[Sample], z: np.ndarray, cal) -> dict:
    """Share of real photos (all, and portraits/people/crowds) scored >= 0.5 at the calibration
    rows' AI share and at the stated prior (``calibrate_and_threshold``), from out-of-fold logits."""
    y = np.array([s.label for s in samples])
    ok = ~np.isnan(z)
    z = np.nan_to_num(z, nan=-50.0)
    fitted, stated = cal.restated(cal.share).apply(z), cal.apply(z)
    people = np.array([s.category in PEOPLE for s in samples])
    out = {"calibration_ai_share": cal.share, "stated_prior": cal.prior, "lean_fpr": LEAN_FPR}
    for name, m in (("real", (y == 0) & ok), ("real_people", (y == 0) & ok & people)):
        if m.any():
            out[name] = {"n": int(m.sum()), "above_0.5_balanced": float((fitted[m] >= 0.5).mean()),
                         "above_0.5_at_prior": float((stated[m] >= 0.5).mean())}
    return out


def people_fp_rates(samples: list[Sample], p: np.ndarray, threshold: float) -> dict[str, dict[str, float]]:
    """Per real-photo category: share scored >= the operating threshold and >= 0.5."""
    out = {}
    y = np.array([s.label for s in samples])
    cats = sorted({s.category for s in samples if s.label == 0})
    for c in cats:
        m = (y == 0) & np.array([s.category == c for s in samples]) & ~np.isnan(p)
        if m.any():
            out[c] = {"n": int(m.sum()), "fp_at_threshold": float((p[m] >= threshold).mean()),
                      "fp_at_0.5": float((p[m] >= 0.5).mean())}
    return out


def train_pixel_probe(
    manifests: list,
    out: Path,
    *,
    cache_dir: Path,
    spec: FeatureSpec | None = None,
    params: ProbeParams | None = None,
    name: str = DEFAULT_PIXEL_MODEL,
    version: str = "5",  # v1: 2 crops; v2: 3 crops; v3: int8 backbone; v4: canonical input; v5: stated prior (docs/pixel-detector.md)
    group_by: str = "generator",
    max_fpr: float = 0.01,
    progress=None,
):
    """The whole recipe: features (cached) -> leave-generator-out CV -> calibration
    and threshold on out-of-fold scores -> final head on everything -> save."""
    from pathlib import Path

    from detectors.models.pixel_backbone import Backbone, calibrate_int8
    from detectors.models.pixel_data import FeatureCache, manifest_digest, read_manifest
    from detectors.models.pixel_features import calibration_crops, extract
    from detectors.models.pixel_probe import HeadCard, PixelHead

    spec = spec or FeatureSpec()
    params = params or ProbeParams()
    manifests = [Path(m) for m in manifests]
    samples, repeats = unique_samples([s for m in manifests for s in read_manifest(m, group_by)])
    if len({s.label for s in samples}) < 2:
        raise ValueError("training needs both AI (label 1) and real (label 0) pictures")
    # int8: activation ranges calibrated on the training pictures, shipped in the head.
    int8 = calibrate_int8(spec.backbone, calibration_crops(samples, spec)) if spec.precision == "int8" else None
    cache = FeatureCache(Path(cache_dir), spec.backbone, spec.draft_min_side, int8=int8)
    variants = sorted(set(params.train_variants) | set(EVAL_VARIANTS))
    skipped = extract(samples, variants, cache, Backbone(spec.backbone, int8=int8), spec, progress=progress)
    cv = cross_validate(samples, cache, spec, params)
    cal, threshold = calibrate_and_threshold(samples, cv, max_fpr)
    metrics = cv_report(samples, cv, cal, threshold)
    metrics["real_categories_reposted"] = people_fp_rates(samples, cal.apply(cv.oof["reposted"]), threshold)
    metrics["prior_reposted"] = prior_report(samples, cv.oof["reposted"], cal)
    metrics["protocol"] = (
        f"{int(cv.fold_of.max()) + 1}-fold GroupKFold, groups = {group_by} for AI pictures and source for real photos; "
        f"probe trained on the {' + '.join(params.train_variants)} variants of the training folds; scores out-of-fold"
    )
    hw = fit_head(samples, cache, spec, params)
    from detectors.models.pixel_data import file_sha256, generator_name

    # Only generators with a few pictures say anything; named without provenance notes.
    gens = [(generator_name(g), m) for g, m in metrics["reposted"]["generators"].items() if m["n_ai"] >= 3]
    weak = list(dict.fromkeys(g for g, m in gens if (m.get("auc") or 1) < 0.8))
    strong = list(dict.fromkeys(g for g, m in gens if (m.get("auc") or 0) >= 0.95))
    card = HeadCard(
        name=name, version=version, spec=spec, calibration=cal, threshold=threshold, int8=int8,
        head="mlp" if params.hidden else "linear",
        threshold_target=f"<= {max_fpr:.0%} false positives on real photos incl. portraits in leave-generator-out tests",
        reliable_on=("generators held out in training, AUC >= 0.95: " + _summarise_names(strong)) if strong
        else "no generator measured above AUC 0.95",
        weak_on="; ".join(
            (["AUC < 0.8 when held out: " + _summarise_names(weak)] if weak else [])
            + ["generator families absent from training (GAN faces without GAN faces in training score as real)",
               "pictures under 224 px on the short side (no opinion) or under 512 px (weaker), "
               "heavily recompressed pictures"]),
        trained_on={
            "manifests": [str(m) for m in manifests],
            "manifest_sha256": manifest_digest(manifests),
            # every picture's digest, so `deepwatch eval --exclude-trained` can leave them out
            "files_sha256": sorted({d for d in map(file_sha256, (s.path for s in samples)) if d}),
            "n_ai": int(sum(s.label for s in samples)), "n_real": int(sum(1 - s.label for s in samples)),
            "seed": params.seed, "C": params.C, "weighting": params.weighting,
            "head": f"mlp({params.hidden}, alpha={params.alpha})" if params.hidden else "linear",
            "train_variants": list(params.train_variants),
            "augmentations": "both classes: re-post (strip, long side <= 1600, JPEG q80); aug: crop 60-100% area, "
                             "resize 0.5-1.0, Gaussian blur 0.3-1.0 px with p=0.3, JPEG q60-95",
            "skipped": [f"{s.path.name} {v}: {r}" for s, v, r in skipped][:20],
            "n_skipped": len(skipped),  # the list above stops at 20
            "duplicates": [f"{d['file']}: {d['reason']} (same bytes as {d['same_as']})" for d in repeats],
        },
        metrics=metrics,
    )
    head = PixelHead(card=card, w=hw.w, b=hw.b, W1=hw.W1, b1=hw.b1)
    head.save(Path(out))
    return head, samples, cv


def _summarise_names(names: list[str], more: str = "") -> str:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return "; ".join(x for x in (shown, more) if x)
