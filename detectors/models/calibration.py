"""Map raw logits to probabilities that mean what they say.

Detectors are fused with provenance evidence, so "0.9" must be comparable
across models: a network trained on few images is badly over-confident. Both
supported methods reduce to ``p = sigmoid(a * logit + b)``: temperature scaling
is the ``b = 0`` special case (one parameter, safer on tiny calibration sets),
Platt fits both.

A probability also assumes a share of AI pictures: the one of the rows it was
fitted on. ``restated`` moves it to another share by Bayes' rule (the
log-odds shift by ``logit(prior) - logit(share)``), which changes what a
score *reads* (how many real photos reach 0.5) but no ranking: AUC, TPR at a
fixed FPR and the set above a threshold moved along with it stay the same.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel

Method = Literal["none", "platt", "temperature"]


class Calibration(BaseModel):
    method: Method = "none"
    a: float = 1.0
    b: float = 0.0
    n: int = 0  # size of the held-out split it was fitted on (0 = never fitted)
    # AI share of the rows it was fitted on, and the share its probabilities are stated for
    # (equal until ``restated``). None in calibrations saved before they were recorded.
    share: float | None = None
    prior: float | None = None

    def restated(self, prior: float) -> "Calibration":
        """The same calibration, its probabilities stated for a stream where ``prior`` of the pictures are AI."""
        if self.share is None:
            raise ValueError("this calibration does not record the AI share it was fitted on")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must be in (0, 1), got {prior}")
        fitted_b = self.b - (_logit(self.prior) - _logit(self.share) if self.prior is not None else 0.0)
        return self.model_copy(update={"b": fitted_b + _logit(prior) - _logit(self.share), "prior": prior})

    def apply(self, logits: np.ndarray) -> np.ndarray:
        z = self.a * np.asarray(logits, dtype=np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def _nll(a: float, b: float, z: np.ndarray, y: np.ndarray) -> float:
    s = a * z + b
    # log(1 + e^s) - y*s, computed stably
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: Method = "platt") -> Calibration:
    """Fit on a held-out split (never on training data: the network has
    memorised those and looks perfectly calibrated there)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if method == "none" or len(z) == 0 or len(np.unique(y)) < 2:
        return Calibration(method="none", n=len(z))
    share = float(y.mean())
    if method == "temperature":
        # 1-D search over log-temperature; robust and dependency-free.
        grid = np.exp(np.linspace(np.log(0.01), np.log(100.0), 400))
        losses = [_nll(1.0 / t, 0.0, z, y) for t in grid]
        t = float(grid[int(np.argmin(losses))])
        return Calibration(method="temperature", a=1.0 / t, b=0.0, n=len(z), share=share, prior=share)
    from sklearn.linear_model import LogisticRegression

    # Mild L2 keeps the slope finite when the split happens to be separable.
    lr = LogisticRegression(C=1.0)
    lr.fit(z.reshape(-1, 1), y.astype(int))
    return Calibration(method="platt", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]), n=len(z), share=share,
                       prior=share)
