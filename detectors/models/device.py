"""Pick the torch device a model runs on, degrading to CPU with a logged reason.

A config written on a GPU box (``device = "cuda"``) must still start on a
laptop or in CI; refusing to start would take the whole detect role down for
what is only a speed difference.
"""

from __future__ import annotations

import glob
import logging
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _accelerator_possible() -> bool:
    """Whether ``auto`` could pick anything but the CPU, answered without importing torch
    (about 180 MB and seconds of start-up): a CPU-only torch build, or no GPU driver on the machine, means no."""
    try:
        if version("torch").endswith("+cpu"):
            return False
    except PackageNotFoundError:
        return False
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return True  # Apple silicon: MPS
    return (Path("/proc/driver/nvidia/version").exists() or bool(glob.glob("/dev/nvidia[0-9]*"))
            or Path("/dev/kfd").exists())  # NVIDIA (CUDA) or AMD (ROCm)


def select_device_lazily(pref: str = "auto") -> "torch.device | str":
    """``select_device``, except that a choice that can only end on the CPU returns ``"cpu"``
    without importing torch: a model that runs in onnxruntime on the CPU then never loads it."""
    pref = (pref or "auto").strip().lower()
    if pref == "cpu" or (pref == "auto" and not _accelerator_possible()):
        return "cpu"
    return select_device(pref)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(pref: str = "auto") -> "torch.device":
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> a usable device."""
    import torch

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


def amp_dtype(amp: str, device: "torch.device | str") -> "torch.dtype | None":
    """The autocast dtype for ``amp`` (``auto | off | bf16 | fp16``) on ``device``.
    ``auto``: on CUDA bf16 where it is native (Ampere, sm_80, on), else fp16;
    nothing elsewhere (CPU autocast is slower than fp32 for these convolutions)."""
    import torch

    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp != "auto":
        raise ValueError(f"amp must be auto, off, bf16 or fp16, not {amp!r}")
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    # is_bf16_supported() also says yes for emulated bf16, which is slower than fp16 on T4/V100
    return torch.bfloat16 if torch.cuda.get_device_capability(dev)[0] >= 8 else torch.float16
