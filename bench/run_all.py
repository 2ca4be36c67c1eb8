"""Run every benchmark in turn (`make bench`). Each prints its own figures and
ratios against a baseline measured in the same run. Pass --quick for a
shorter pass (smaller index, fewer images). A bench whose data is not there
(``../shared/data``, absent in a clean clone) is skipped with the reason, and
does not fail the run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"

# What each bench reads besides the repository (None: nothing).
NEEDS = {"neardup.py": [SHARED / "detect-dev", SHARED / "detect-dev2"]}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    only = {a for a in sys.argv[1:] if a.endswith(".py")}  # e.g. `run_all.py --quick soak.py`
    runs = [
        ["neardup.py", *(["--quick"] if quick else [])],
        ["detector_throughput.py", *(["--seconds", "2"] if quick else [])],
        ["replay.py", *(["--pictures", "20"] if quick else [])],
        ["soak.py", *(["--quick"] if quick else ["--seconds", "900"])],
        ["clusters.py", *(["--limit", "150"] if quick else [])],
        ["cluster_scale.py", *(["--sizes", "200000"] if quick else ["--sizes", "1000000"])],
        ["viral_cluster.py", *(["--reposts", "3000"] if quick else [])],
        ["similar.py", *(["--sizes", "10000", "--lookups", "2"] if quick else [])],
    ]
    failed, skipped = 0, []
    runs = [r for r in runs if not only or r[0] in only]
    for script, *args in runs:
        missing = [p for p in NEEDS.get(script) or [] if not p.is_dir()]
        if missing:
            reason = f"needs {', '.join(map(str, missing))} (the shared data set; absent in a clean clone)"
            print(f"\n=== {script}: SKIPPED: {reason}", flush=True)
            skipped.append(script)
            continue
        print(f"\n=== {script} {' '.join(args)}", flush=True)
        failed += subprocess.call([sys.executable, str(HERE / script), *args]) != 0
    print(f"\n{len(runs) - len(skipped) - failed} bench(es) ran, {failed} failed, {len(skipped)} skipped"
          + (f" ({', '.join(skipped)})" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
