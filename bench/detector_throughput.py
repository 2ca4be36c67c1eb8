"""Images/s of each model architecture at batch 1, 16 and 64, on CPU and (when
present) GPU, with the speed-up over batch 1 measured in the same run.

Measures the forward pass on preprocessed tensors (what MicroBatcher's
inference thread does), with randomly initialised weights: speed does not
depend on the weights. Usage: python bench/detector_throughput.py [--seconds S]
"""

from __future__ import annotations

import argparse
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per (arch, batch)")
    ap.add_argument("--arch", action="append", help="limit to these architectures")
    args = ap.parse_args()
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
