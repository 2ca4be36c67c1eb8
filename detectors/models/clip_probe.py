"""UnivFD-style detector (Ojha et al., CVPR 2023): a frozen CLIP image encoder
and one linear layer on its embedding. CLIP features were never trained to
tell real from fake, which is why the probe generalises across generators
better than a CNN trained end to end on one generator.

Only available when ``open_clip`` is importable. The backbone weights are a
separate safetensors file in the model dir (``arch_params.backbone_file``,
fetched with ``deepwatch models fetch``); nothing is downloaded here:
``pretrained=None`` keeps open_clip from reaching the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def clip_available() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:
        return False
    return True


class ClipProbe(nn.Module):
    def __init__(self, visual: nn.Module, embed_dim: int):
        super().__init__()
        self.visual = visual
        self.fc = nn.Linear(embed_dim, 1)
        for p in self.visual.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.visual(x)
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.fc(feats.float()).squeeze(1)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        # The checkpoint holds only the probe; the frozen backbone lives in its own file.
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if k.startswith("fc.")}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.fc.load_state_dict({k[3:]: v for k, v in state_dict.items() if k.startswith("fc.")}, strict=strict)


def build_clip_probe(params: dict[str, Any], model_dir: Path | None) -> ClipProbe:
    if not clip_available():
        raise RuntimeError("the clip-probe architecture needs open_clip: pip install open_clip_torch (and a CLIP backbone)")
    import open_clip
    from safetensors.torch import load_file

    model = open_clip.create_model(params["clip_model"], pretrained=None)
    visual = model.visual
    backbone = params.get("backbone_file")
    if backbone:
        if model_dir is None or not (model_dir / backbone).is_file():
            raise FileNotFoundError(
                f"CLIP backbone {backbone!r} not found in {model_dir}; fetch it with "
                f"`deepwatch models fetch {Path(backbone).stem} --url ...`"
            )
        state = load_file(str(model_dir / backbone))
        # Accept either a full CLIP state dict or the visual tower alone.
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        visual.load_state_dict(state)
    embed_dim = int(getattr(visual, "output_dim", 0) or params.get("embed_dim", 768))
    return ClipProbe(visual.eval(), embed_dim)
