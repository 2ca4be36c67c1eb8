"""Checkpoint = ``<name>.safetensors`` (weights only) + ``<name>.json`` (the card).

(A pixel head, ``deepwatch train --recipe pixel-probe``, is one ``<name>.safetensors``
holding its card in the metadata: ``list_pixel_heads``, ``pixel_head_path``.)

The card carries everything needed to use the weights correctly and to judge
them: architecture and its parameters, input size and normalisation,
calibration, operating threshold and how the model was trained. Weights are
safetensors only: loading them cannot execute code, unlike pickled ``.pt``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from detectors.atomic_file import write_atomically
from detectors.models.calibration import Calibration

if TYPE_CHECKING:  # checkpoints hold torch tensors; reading model cards does not need torch
    import torch

CARD_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class InputSpec(BaseModel):
    size: int = 256  # square side fed to the network
    # "crop": keep native resolution and centre-crop (pixel-level artefacts such
    # as NPR's survive); "resize": shorter side to ``size`` then crop (CLIP).
    mode: Literal["crop", "resize"] = "crop"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ModelCard(BaseModel):
    format: int = CARD_FORMAT
    name: str
    arch: str  # key in detectors.models.nets.ARCHITECTURES
    arch_params: dict[str, Any] = Field(default_factory=dict)
    version: str = "1"
    display_name: str | None = None  # e.g. "NPR-R50"; defaults to arch
    input: InputSpec = Field(default_factory=InputSpec)
    calibration: Calibration = Field(default_factory=Calibration)
    threshold: float = 0.5  # operating point on the calibrated probability
    training: dict[str, Any] = Field(default_factory=dict)  # data, epochs, held-out metrics, ...
    weights_sha256: str | None = None

    @property
    def label(self) -> str:
        return self.display_name or self.arch


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return name


def paths(model_dir: Path, name: str) -> tuple[Path, Path]:
    validate_name(name)
    return model_dir / f"{name}.safetensors", model_dir / f"{name}.json"


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(model_dir: Path, card: ModelCard, state_dict: dict[str, "torch.Tensor"]) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    weights, sidecar = paths(model_dir, card.name)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    from safetensors.torch import save

    data = save(tensors, metadata={"deepwatch_arch": card.arch, "deepwatch_version": card.version})
    card = card.model_copy(update={"weights_sha256": hashlib.sha256(data).hexdigest()})
    write_atomically(weights, data)
    write_card(sidecar, card)
    return weights


def write_card(sidecar: Path, card: ModelCard) -> None:
    write_atomically(sidecar, (json.dumps(card.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode())


def read_card(model_dir: Path, name: str) -> ModelCard:
    _, sidecar = paths(model_dir, name)
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"model {name!r} not found in {model_dir} (expected {sidecar.name}); "
            f"fetch it with `deepwatch models fetch {name} --url ...` or train one with `deepwatch train`"
        )
    return ModelCard.model_validate_json(sidecar.read_text())


def load_checkpoint(model_dir: Path, name: str, *, verify: bool = True) -> tuple[ModelCard, dict[str, "torch.Tensor"]]:
    card = read_card(model_dir, name)
    weights, _ = paths(model_dir, name)
    if not weights.is_file():
        raise FileNotFoundError(f"weights for model {name!r} missing: {weights}")
    if verify and card.weights_sha256 and sha256_file(weights) != card.weights_sha256:
        raise ValueError(f"weights {weights} do not match the sha256 recorded in {name}.json (corrupt or replaced)")
    from safetensors.torch import load_file

    return card, load_file(str(weights))


def pixel_head_path(model_dir: Path, name: str) -> Path | None:
    """``<model_dir>/<name>.safetensors`` when it is a pixel head (``deepwatch train --recipe
    pixel-probe`` writes one file, its card in the safetensors metadata, no ``.json``); else None."""
    weights, sidecar = paths(model_dir, name)
    if sidecar.exists() or not weights.is_file():
        return None
    return weights if _pixel_card(weights) is not None else None


def _pixel_card(path: Path):
    """The pixel-head card in ``path``'s safetensors metadata, or None (not one, or unreadable)."""
    from detectors.models.pixel_probe import CARD_KEY, HeadCard

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        return HeadCard.model_validate_json(meta[CARD_KEY]) if CARD_KEY in meta else None
    except Exception:  # noqa: BLE001  a damaged or foreign file is not a head; listing must not crash on it
        return None


def list_pixel_heads(model_dir: Path) -> list[tuple[str, Path, Any]]:
    """(name for ``--model``, path, ``HeadCard``) of every pixel head in ``model_dir``: the
    ``*.safetensors`` files without a ``.json`` card that carry the deepwatch pixel-head metadata."""
    if not model_dir.is_dir():
        return []
    out = []
    for weights in sorted(model_dir.glob("*.safetensors")):
        if weights.with_suffix(".json").exists() or not _NAME_RE.match(weights.stem):
            continue
        card = _pixel_card(weights)
        if card is not None:
            out.append((weights.stem, weights, card))
    return out


def list_models(model_dir: Path) -> list[ModelCard]:
    if not model_dir.is_dir():
        return []
    cards = []
    for sidecar in sorted(model_dir.glob("*.json")):
        try:
            cards.append(ModelCard.model_validate_json(sidecar.read_text()))
        except Exception:  # a stray JSON file is not a model; listing must not crash on it
            continue
    return cards
