"""Run every benchmark in turn (`make bench`). Each prints its own figures and
ratios against a baseline measured in the same run. Pass --quick for a
shorter pass (smaller index, fewer images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    runs = [
        ["neardup.py", *(["--quick"] if quick else [])],
        ["detector_throughput.py", *(["--seconds", "2"] if quick else [])],
        ["replay.py", *(["--pictures", "20"] if quick else [])],
        ["clusters.py", *(["--limit", "150"] if quick else [])],
        ["cluster_scale.py", *(["--sizes", "200000"] if quick else ["--sizes", "1000000"])],
    ]
    failed = 0
    for script, *args in runs:
        print(f"\n=== {script} {' '.join(args)}", flush=True)
        failed += subprocess.call([sys.executable, str(HERE / script), *args]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
