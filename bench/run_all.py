"""Run every benchmark in turn (`make bench`). Each prints its own figures and
ratios against a baseline measured in the same run. Pass --quick for a
shorter pass (smaller index, fewer images). A bench whose data is not there
(``../shared/data``, absent in a clean clone) is skipped with the reason, and
does not fail the run.

Every bench script in bench/ runs, once each (the list in ``main``). Not
run here: ``desk.py --view`` and ``desk.py --verdict``, other modes of the
desk bench, run by hand (``--verdict`` builds a 60,000-cluster store); and
``naive_pipeline.py`` (the baseline replay.py runs as its own process),
``neardup_images.py`` and ``neardup_transforms.py``, which are no benches
but parts of the others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from streams.plurals import counted  # noqa: E402
SHARED = HERE.parent.parent / "shared" / "data"

# What each bench reads besides the repository (None: nothing). fetch_ahead.py builds its feed from
# whichever of detect-dev, detect-dev2 is there, and says itself when neither is.
NEEDS = {"neardup.py": [SHARED / "detect-dev", SHARED / "detect-dev2"],
         "hashing.py": [SHARED / "detect-dev", SHARED / "detect-dev2", SHARED / "train-extra"]}


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
        ["connectors.py", *(["--frames", "2000"] if quick else [])],
        ["desk.py", *(["--clusters", "2000", "--baseline", "200"] if quick else [])],
        ["fetch_ahead.py", *(["--events", "200", "--rounds", "1"] if quick else [])],
        ["hashing.py", *(["--limit", "60", "--repeat", "1"] if quick else [])],
        ["search.py", *(["--clusters", "1000"] if quick else [])],
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
    print(f"\n{counted(len(runs) - len(skipped) - failed, 'bench', 'benches')} ran, {failed} failed, {len(skipped)} skipped"
          + (f" ({', '.join(skipped)})" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
