"""Train (from scratch or from an existing checkpoint) and calibrate a model.

Honest scope: with no pretrained backbone available offline, a network trained
from scratch on a few hundred images learns *something* about the images it
saw and little that transfers to unseen generators. The held-out metrics
recorded in the card say how much.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from detectors.imagedata import ImageData, ImageRejected
from detectors.models.calibration import Method, fit_calibration
from detectors.models.checkpoint import InputSpec, ModelCard, load_checkpoint, save_checkpoint, validate_name
from detectors.models.dataset import Sample, repost_bytes
from detectors.models.nets import build_net, get_arch
from detectors.models.transforms import TrainAugment, eval_transform

log = logging.getLogger(__name__)

# Training keeps decoded images in memory. Large camera photos are centre-
# cropped (never resized: resampling only one class's big images would itself
# be a shortcut) to bound memory.
_MAX_CACHED_SIDE = 1024
_MAX_RECORDED_FILES = 5000

Progress = Callable[[str, int, int, dict[str, float]], None]  # (phase, done, total, stats)


@dataclass
class TrainConfig:
    arch: str = "small-cnn"
    name: str = "detector"
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    input_size: int | None = None
    arch_params: dict[str, Any] = field(default_factory=dict)
    calib_fraction: float = 0.25
    calibration: Method = "platt"
    seed: int = 0
    init_from: str | None = None  # fine-tune an existing checkpoint in model_dir
    version: str = "1"
    augment: dict[str, Any] = field(default_factory=dict)  # overrides for TrainAugment


def _load_image(sample: Sample) -> tuple[Image.Image, bytes] | None:
    try:
        data = sample.path.read_bytes()
        img = ImageData(data, path=str(sample.path)).rgb
    except (OSError, ImageRejected) as e:
        log.warning("skipping %s: %s", sample.path, e)
        return None
    w, h = img.size
    if max(w, h) > _MAX_CACHED_SIDE:
        cw, ch = min(w, _MAX_CACHED_SIDE), min(h, _MAX_CACHED_SIDE)
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    return img, data


def _split(samples: list[Sample], frac: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified random split: calibration needs both classes."""
    rng = random.Random(seed)
    train, calib = [], []
    for label in (0, 1):
        group = [s for s in samples if s.label == label]
        rng.shuffle(group)
        k = max(1, round(len(group) * frac)) if len(group) >= 2 and frac > 0 else 0
        calib += group[:k]
        train += group[k:]
    return train, calib


def _eval_logits(net: nn.Module, tensors: list[torch.Tensor], batch: int = 32) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(tensors), batch):
            out.append(net(torch.stack(tensors[i : i + batch])).float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_model(samples: list[Sample], model_dir: Path, cfg: TrainConfig, progress: Progress | None = None) -> ModelCard:
    validate_name(cfg.name)
    spec = get_arch(cfg.arch)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    input_spec: InputSpec = spec.default_input.model_copy(
        update={"size": cfg.input_size} if cfg.input_size else {}
    )
    params = {**spec.default_params, **cfg.arch_params}
    net = build_net(cfg.arch, params, model_dir)
    if cfg.init_from:
        _, state = load_checkpoint(model_dir, cfg.init_from)
        net.load_state_dict(state, strict=True)

    train_s, calib_s = _split(samples, cfg.calib_fraction, cfg.seed)
    loaded = [(s, _load_image(s)) for s in train_s]
    train_items = [(s, x[0]) for s, x in loaded if x is not None]
    used_sha = [hashlib.sha256(x[1]).hexdigest() for _, x in loaded if x is not None]
    calib_loaded = [(s, _load_image(s)) for s in calib_s]
    calib_items = [(s, x) for s, x in calib_loaded if x is not None]
    used_sha += [hashlib.sha256(x[1]).hexdigest() for _, x in calib_items]
    del loaded
    n_pos = sum(s.label for s, _ in train_items)
    n_neg = len(train_items) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"training needs both classes (got {n_pos} AI, {n_neg} real images)")

    aug = TrainAugment(input_spec, seed=cfg.seed, **cfg.augment)
    trainable = spec.trainable(net) if spec.trainable else [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, -(-len(train_items) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    # Class imbalance: weight positives so both classes pull equally.
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / n_pos))
    rng = random.Random(cfg.seed)
    t0 = time.monotonic()
    history = []
    for epoch in range(cfg.epochs):
        net.train()
        order = list(range(len(train_items)))
        rng.shuffle(order)
        total, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                continue
            x = torch.stack([aug(train_items[i][1]) for i in idx])
            y = torch.tensor([float(train_items[i][0].label) for i in idx])
            loss = loss_fn(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            if progress:
                progress("train", epoch * steps_per_epoch + step + 1, cfg.epochs * steps_per_epoch,
                         {"epoch": epoch + 1, "loss": total / max(1, seen)})
        history.append(round(total / max(1, seen), 4))

    # Calibrate on the held-out split, both as-is and re-posted, so the
    # probabilities stay meaningful for images that went through a platform.
    calib_tensors, calib_labels = [], []
    for s, (img, data) in calib_items:
        calib_tensors.append(eval_transform(img, input_spec))
        calib_labels.append(s.label)
        try:
            rep = ImageData(repost_bytes(data)).rgb
            calib_tensors.append(eval_transform(rep, input_spec))
            calib_labels.append(s.label)
        except Exception:  # noqa: BLE001  a repost failure only costs a calibration point
            pass
    z = _eval_logits(net, calib_tensors)
    y = np.asarray(calib_labels)
    calibration = fit_calibration(z, y, cfg.calibration)
    held_out: dict[str, Any] = {"n": int(len(y)), "n_pos": int(y.sum()) if len(y) else 0}
    if len(np.unique(y)) == 2:
        from sklearn.metrics import roc_auc_score

        held_out["auc"] = round(float(roc_auc_score(y, z)), 4)
    if progress:
        progress("calibrate", 1, 1, held_out)

    card = ModelCard(
        name=cfg.name,
        arch=cfg.arch,
        arch_params=params,
        version=cfg.version,
        display_name=spec.display,
        input=input_spec,
        calibration=calibration,
        threshold=0.5,
        training={
            "from_scratch": cfg.init_from is None,
            "init_from": cfg.init_from,
            "n_train": len(train_items),
            "n_train_pos": n_pos,
            "n_train_neg": n_neg,
            "generators": sorted({s.generator for s, _ in train_items if s.label == 1 and s.generator}),
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "loss_history": history,
            "augment": aug.describe(),
            "calibration_split": held_out,
            "seconds": round(time.monotonic() - t0, 1),
            "torch": torch.__version__,
            "seed": cfg.seed,
            # Content hashes of every file used (train + calibration), so eval
            # can leave them out (`deepwatch eval --exclude-trained`).
            "files_sha256": sorted(used_sha)[:_MAX_RECORDED_FILES],
            "files_truncated": len(used_sha) > _MAX_RECORDED_FILES,
        },
    )
    save_checkpoint(model_dir, card, net.state_dict())
    return card
