"""Pick the torch device a model runs on, degrading to CPU with a logged reason.

A config written on a GPU box (``device = "cuda"``) must still start on a
laptop or in CI; refusing to start would take the whole detect role down for
what is only a speed difference.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(pref: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> a usable device."""
    pref = (pref or "auto").strip().lower()
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            log.warning("device %r requested but CUDA is not available (torch %s); using cpu", pref, torch.__version__)
            return torch.device("cpu")
        dev = torch.device(pref)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            log.warning("device %r requested but only %d CUDA device(s); using cuda:0", pref, torch.cuda.device_count())
            return torch.device("cuda:0")
        return dev
    if pref == "mps":
        if not _mps_available():
            log.warning("device 'mps' requested but MPS is not available; using cpu")
            return torch.device("cpu")
        return torch.device("mps")
    log.warning("unknown device %r; using cpu", pref)
    return torch.device("cpu")
