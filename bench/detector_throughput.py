"""Images/s of each model architecture at batch 1, 16 and 64, on CPU and (when
present) GPU, with the speed-up over batch 1 measured in the same run.

Two parts:

* ``pixel``: the packaged pixel detector END TO END (JPEG bytes -> decode ->
  crops -> backbone -> head -> calibrated score), on synthetic JPEGs of two
  sizes (a 12 MP camera original and a 1600 px re-post), at batch 1/16/64 and
  with 1, 3 (shipped) and 5 crops; plus decode time with JPEG draft mode
  against a full decode, measured in the same run (the ratio is the point);
  and, when the shipped head runs the int8 backbone, int8 against the fp32
  graph end to end at batch 16, interleaved round by round (``--rounds``).
* ``arch``: the forward pass of the trainable architectures on preprocessed
  tensors (what MicroBatcher's inference thread does), randomly initialised:
  speed does not depend on the weights.

Usage: python bench/detector_throughput.py [--seconds S] [--part pixel|int8|arch|all] [--rounds N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from detectors.models.checkpoint import ModelCard
from detectors.models.clip_probe import clip_available
from detectors.models.detector import ModelDetector
from detectors.models.nets import ARCHITECTURES, build_net

BATCHES = (1, 16, 64)


def bench(det: ModelDetector, batch: int, seconds: float) -> float:
    x = torch.randn(batch, 3, det.card.input.size, det.card.input.size)
    # Warm-up: oneDNN/cuDNN pick kernels and the allocator grows on the first
    # calls per shape; on CPU the first several b=1 calls were measured 10-20x slower.
    t0 = time.perf_counter()
    for i in range(50):
        det.infer(x)
        if i >= 5 and time.perf_counter() - t0 > 2.0:
            break
    n, t0 = 0, time.perf_counter()
    while True:
        det.infer(x)  # returns numpy: includes the device sync
        n += batch
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 2 * batch:
            return n / dt


def _jpegs(size: tuple[int, int], n: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    w, h = size
    for _ in range(n):
        # smooth gradients + noise: JPEG cost similar to a photo
        base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, 3) + np.linspace(0, 80, h)[:, None, None]
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def _pngs(size: tuple[int, int], n: int) -> list[bytes]:
    """Lossless copies of ``_jpegs``' pictures: what an AI picture as published often is."""
    import io

    from PIL import Image

    out = []
    for d in _jpegs(size, n):
        buf = io.BytesIO()
        Image.open(io.BytesIO(d)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _rate(fn, n_items: int, seconds: float) -> float:
    """Items/s of the MEDIAN call (after two warm-up calls), over at least ``seconds``
    and 5 calls: on a machine shared with other jobs a window average is dominated
    by moments this process was not scheduled; the median is not."""
    fn()  # warm-up (kernel selection, allocator), twice
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return n_items / times[len(times) // 2]


def bench_pixel(seconds: float, rounds: int = 7) -> None:
    from detectors.imagedata import ImageData
    from detectors.models.pixel_backbone import FeatureSpec, decode_for_model, image_crops
    from detectors.models.pixel_detector import load_pixel_detector

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if len(devices) == 1:
        print("pixel detector: no GPU in this session; CPU only")
    # Baselines in the same run: a full decode, and the draft decode of the picture as given; "canonical"
    # re-posts first what does not look like a re-post (the shipped head's input: 1600 px q88 JPEGs
    # are used as they are, a 4000 px camera JPEG or a PNG is re-posted first).
    for size, fmt in (((4000, 3000), "JPEG"), ((1600, 1067), "JPEG"), ((1024, 1024), "PNG")):
        data = _jpegs(size, 4) if fmt == "JPEG" else _pngs(size, 4)
        spec, as_given = FeatureSpec(), FeatureSpec(canonical_input=False)
        full = _rate(lambda: [image_crops(ImageData(d).rgb, spec.crops) for d in data], len(data), seconds)
        draft = _rate(lambda: [image_crops(decode_for_model(ImageData(d), as_given), spec.crops) for d in data], len(data), seconds)
        canon = _rate(lambda: [image_crops(decode_for_model(ImageData(d), spec), spec.crops) for d in data], len(data), seconds)
        print(f"decode+crop {size[0]}x{size[1]} {fmt}: full decode {full:7.1f} img/s, draft decode {draft:7.1f} img/s"
              f" ({draft / full:.2f}x), canonical {canon:7.1f} img/s ({canon / draft:.2f}x draft)")
    repost = _jpegs((1600, 1067), 64)
    # On a GPU, fp32 first: the baseline the default autocast (bf16, fp16 before Ampere) is read against.
    for dev, amp in [(d, a) for d in devices for a in (("auto",) if d == "cpu" else ("off", "auto"))]:
        det = load_pixel_detector(device=dev, amp=amp)
        shipped = det.spec.crops
        print(f"{dev} ({det.backbone.runtime}): end-to-end images/s (1600 px JPEG re-posts), "
              f"shipped head uses {shipped} crop(s)")
        print(f"{'crops':>5} " + " ".join(f"{'b=' + str(b):>8}" for b in BATCHES) + "  " + " ".join(f"{'x b' + str(b):>6}" for b in BATCHES[1:])
              + "  fwd-only b=16  e2e/fwd")
        for crops in (1, shipped, 5) if shipped not in (1, 5) else (1, 5):
            det.spec = det.spec.model_copy(update={"crops": crops})
            rates = []
            for b in BATCHES:
                imgs = repost[:b]
                # fresh ImageData each call: the decode is part of the cost
                rates.append(_rate(lambda: det.logits([ImageData(d) for d in imgs]), b, seconds))
            # Baseline in the same run: the backbone forward alone on ready crops (no decode, no head).
            crops_t = np.random.default_rng(0).uniform(-1, 1, (16 * crops, 3, 224, 224)).astype(np.float32)
            fwd = _rate(lambda: det.backbone.taps(crops_t), 16, seconds)
            print(f"{crops:>5} " + " ".join(f"{r:8.1f}" for r in rates) + "  " + " ".join(f"{r / rates[0]:6.2f}" for r in rates[1:])
                  + f"  {fwd:13.1f}  {rates[1] / fwd:7.2f}", flush=True)
        det.spec = det.spec.model_copy(update={"crops": shipped})
        if det.backbone.runtime == "onnxruntime":
            # Baseline in the same run: the same backbone forward in torch (channels-last, folded BNs).
            crops_t = np.random.default_rng(0).uniform(-1, 1, (16 * shipped, 3, 224, 224)).astype(np.float32)
            fwd_ort = _rate(lambda: det.backbone.taps(crops_t), 16, seconds)
            ort, det.backbone._ort = det.backbone._ort, None
            fwd_torch = _rate(lambda: det.backbone.taps(crops_t), 16, seconds)
            det.backbone._ort = ort
            print(f"{det.spec.backbone} forward, {shipped} crops, b=16: onnxruntime {fwd_ort:.1f} img/s, "
                  f"torch {fwd_torch:.1f} img/s, ort/torch = {fwd_ort / fwd_torch:.2f}x", flush=True)
        if det.backbone.quantized:
            compare_precisions(det, repost[:16], rounds)


def compare_precisions(det, jpegs: list[bytes], rounds: int) -> None:
    """int8 against fp32 end to end (decode + crops + backbone + head) at batch 16, interleaved:
    each round times every (precision, crops) cell once, so load changes hit all cells alike."""
    import os
    import statistics

    from detectors.imagedata import ImageData
    from detectors.models.pixel_backbone import Backbone

    backbones = {"fp32": Backbone(det.spec.backbone, int8=None), "int8": det.backbone}
    shipped = det.spec.crops
    cells = [(p, k) for k in dict.fromkeys((shipped, 4, 5)) for p in backbones]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for r in range(rounds + 1):  # round 0 warms every cell up
        for p, k in cells:
            det.backbone, det.spec = backbones[p], det.spec.model_copy(update={"crops": k})
            t0 = time.perf_counter()
            det.logits([ImageData(d) for d in jpegs])
            if r:
                times[(p, k)].append(len(jpegs) / (time.perf_counter() - t0))
    det.backbone, det.spec = backbones["int8"], det.spec.model_copy(update={"crops": shipped})
    print(f"int8 vs fp32, end to end b={len(jpegs)}, {rounds} interleaved rounds (median img/s), load {os.getloadavg()[0]:.1f}:")
    for k in dict.fromkeys((shipped, 4, 5)):
        f, q = statistics.median(times[("fp32", k)]), statistics.median(times[("int8", k)])
        print(f"  {k} crops: fp32 {f:6.1f}  int8 {q:6.1f}  int8/fp32 = {q / f:.2f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per (arch, batch)")
    ap.add_argument("--arch", action="append", help="limit to these architectures")
    ap.add_argument("--part", choices=("pixel", "int8", "arch", "all"), default="all",
                    help="int8: only the interleaved int8-vs-fp32 comparison of the pixel detector")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the int8-vs-fp32 comparison")
    args = ap.parse_args()
    if args.part == "int8":
        from detectors.models.pixel_detector import load_pixel_detector

        det = load_pixel_detector(device="cpu")
        if not det.backbone.quantized:
            raise SystemExit(f"the pixel detector runs {det.backbone.runtime}, not int8: nothing to compare")
        compare_precisions(det, _jpegs((1600, 1067), 16), args.rounds)
        return
    if args.part in ("pixel", "all"):
        bench_pixel(args.seconds, args.rounds)
    if args.part == "pixel":
        return
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    archs = args.arch or [a for a in ARCHITECTURES if a != "clip-probe" or clip_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':6} {'arch':10} {'input':>5} " + " ".join(f"{'b=' + str(b) + ' img/s':>12}" for b in BATCHES)
          + "  " + " ".join(f"{'x b' + str(b):>6}" for b in BATCHES[1:]))
    for dev in devices:
        for arch in archs:
            spec = ARCHITECTURES[arch]
            params = dict(spec.default_params)
            if arch == "clip-probe":
                params["backbone_file"] = None  # random backbone: same speed, no weights needed
            card = ModelCard(name=arch, arch=arch, arch_params=params, input=spec.default_input)
            det = ModelDetector(card, build_net(arch, params), dev)
            rates = [bench(det, b, args.seconds) for b in BATCHES]
            print(f"{dev.type:6} {arch:10} {card.input.size:>5} " + " ".join(f"{r:12.1f}" for r in rates)
                  + "  " + " ".join(f"{r / rates[0]:6.2f}" for r in rates[1:]), flush=True)


if __name__ == "__main__":
    main()
