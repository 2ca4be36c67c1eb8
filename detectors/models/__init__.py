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

import os

# onnxruntime's Linux wheel (1.31) ships Microsoft's 1DS telemetry, on unless
# opted out: its first session writes a persistent device id and an event cache
# under $XDG_CACHE_HOME/Microsoft (the image's data volume) and uploads usage events. A newsroom's monitor must not
# report its use to a third party, nor try to reach one from a closed network.
# onnxruntime reads the opt-out once, as it initialises: here, the package every
# use of it in deepwatch is imported through, before any of them. An operator
# who sets the variable keeps their value.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from detectors.models.batching import MicroBatcher  # noqa: E402
from detectors.models.checkpoint import ModelCard, list_models  # noqa: E402
from detectors.models.detector import BatchDetector, ModelDetector, load_detector  # noqa: E402
from detectors.models.device import select_device  # noqa: E402

__all__ = [
    "BatchDetector",
    "MicroBatcher",
    "ModelCard",
    "ModelDetector",
    "list_models",
    "load_detector",
    "select_device",
]
