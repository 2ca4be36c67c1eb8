"""Network architectures, in plain torch (no torchvision/timm: those would pull
a CUDA torch wheel onto CPU boxes).

* ``npr-r50``: NPR (Tan et al., CVPR 2024, "Rethinking the Up-Sampling
  Operations in CNN-based Generative Network for Generalizable Deepfake
  Detection"). Generators upsample with nearest/transposed convs, which leaves
  correlations between neighbouring pixels inside each 2x2 cell; the residual
  ``x - up(down(x))`` isolates them and a ResNet-50 truncated after ``layer2``
  classifies it. Module names follow torchvision's ResNet (and the reference
  implementation) so published NPR weights load after a pickle->safetensors
  conversion (``deepwatch models fetch --allow-pickle``).
* ``small-cnn``: four conv blocks on the same residual; small enough to train
  in seconds on a CPU for tests and quick experiments.
* ``clip-probe``: see ``detectors.models.clip_probe`` (needs open_clip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from detectors.models.checkpoint import InputSpec


def npr_residual(x: torch.Tensor) -> torch.Tensor:
    """``x - nearest_up(nearest_down(x))``: zero wherever a 2x2 cell is flat,
    i.e. exactly the structure nearest-neighbour upsampling would leave."""
    h, w = x.shape[-2] - x.shape[-2] % 2, x.shape[-1] - x.shape[-1] % 2
    x = x[..., :h, :w]
    return x - F.interpolate(x[..., ::2, ::2], scale_factor=2.0, mode="nearest")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class NPRResNet(nn.Module):
    """ResNet-50 stem + layer1 + layer2 on the NPR residual, 1 logit out."""

    def __init__(self, layers: tuple[int, int] = (3, 4), width: int = 64):
        super().__init__()
        self.inplanes = width
        # 3x3/stride-2 stem (not 7x7) as in the NPR reference: the residual is
        # high-frequency, a large first kernel would mostly average it away.
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(width * 2 * Bottleneck.expansion, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        mods = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        mods += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2/3 rescale as in the reference so published weights see the same range.
        x = self.conv1(npr_residual(x) * (2.0 / 3.0))
        x = self.maxpool(self.relu(self.bn1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc1(torch.flatten(self.avgpool(x), 1)).squeeze(1)


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16, npr: bool = True):
        super().__init__()
        self.npr = npr
        chans = [3, width, width * 2, width * 4, width * 4]
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(chans[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.npr:
            x = npr_residual(x)
        x = self.features(x)
        return self.fc(x.mean(dim=(2, 3))).squeeze(1)


@dataclass(frozen=True)
class ArchSpec:
    display: str
    build: Callable[[dict[str, Any], Path | None], nn.Module]
    default_input: InputSpec
    default_params: dict[str, Any] = field(default_factory=dict)
    # Parameters optimised during training; None = all (clip-probe trains only its head).
    trainable: Callable[[nn.Module], list[nn.Parameter]] | None = None


def _build_npr(params: dict[str, Any], _model_dir: Path | None) -> nn.Module:
    return NPRResNet(layers=tuple(params.get("layers", (3, 4))), width=int(params.get("width", 64)))


def _build_small(params: dict[str, Any], _model_dir: Path | None) -> nn.Module:
    return SmallCNN(width=int(params.get("width", 16)), npr=bool(params.get("npr", True)))


def _build_clip(params: dict[str, Any], model_dir: Path | None) -> nn.Module:
    from detectors.models.clip_probe import build_clip_probe  # imports open_clip lazily

    return build_clip_probe(params, model_dir)


ARCHITECTURES: dict[str, ArchSpec] = {
    "npr-r50": ArchSpec("NPR-R50", _build_npr, InputSpec(size=224, mode="crop")),
    "small-cnn": ArchSpec("SmallCNN", _build_small, InputSpec(size=64, mode="crop")),
    "clip-probe": ArchSpec(
        "CLIP-probe",
        _build_clip,
        InputSpec(
            size=224,
            mode="resize",
            mean=(0.48145466, 0.4578275, 0.40821073),
            std=(0.26862954, 0.26130258, 0.27577711),
        ),
        default_params={"clip_model": "ViT-L-14", "backbone_file": "clip-vit-l-14.safetensors"},
        trainable=lambda m: list(m.fc.parameters()),  # type: ignore[union-attr]
    ),
}


def get_arch(arch: str) -> ArchSpec:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None


def build_net(arch: str, params: dict[str, Any], model_dir: Path | None = None) -> nn.Module:
    spec = get_arch(arch)
    return spec.build({**spec.default_params, **params}, model_dir)
