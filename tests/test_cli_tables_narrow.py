"""CLI tables on 80 columns (a pipe, or an 80-column terminal): the column
that names the row is never cut. `models list` showed the model name as
"pixel-…" (the value --model takes) and `eval` cut detector names to
"genera…"; the other columns give way instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import picture


def _cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    # stdout is a pipe here: rich lays tables out for COLUMNS, 80 as an 80-column terminal would
    r = subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": str(columns)})
    assert r.returncode == 0, (r.returncode, r.stderr)
    return r


def _cells(table: str) -> set[str]:
    """Every cell text of a rendered table, as split by its rules or by runs of spaces."""
    out: set[str] = set()
    for line in table.splitlines():
        assert len(line) <= 80, line  # nothing laid out wider than the terminal either
        for part in line.replace("│", "  ").replace("┃", "  ").split("  "):
            if part.strip():
                out.add(part.strip())
    return out


def test_models_list_shows_every_model_name_whole(tmp_path: Path):
    names = [m["name"] for m in json.loads(_cli("models", "list", "--json", "-d", str(tmp_path)).stdout)]
    assert names  # the packaged pixel head at least
    cells = _cells(_cli("models", "list", "-d", str(tmp_path)).stdout)
    assert all(name in cells for name in names), (names, cells)
    assert not any("…" in c for c in cells), cells


def test_eval_shows_every_detector_name_whole(tmp_path: Path):
    for label, seeds in (("ai", range(3)), ("real", range(3, 6))):
        (tmp_path / "set" / label).mkdir(parents=True)
        for s in seeds:
            picture(s, (256, 192)).save(tmp_path / "set" / label / f"p{s}.jpg", quality=90)
    report = json.loads(_cli("eval", str(tmp_path / "set"), "--format", "json").stdout)
    names = {d for v in report["variants"].values() for d in v["detectors"]}
    assert any(len(n) > 12 for n in names), names  # names long enough to have been cut before
    out = _cli("eval", str(tmp_path / "set")).stdout
    cells = _cells(out)
    assert names <= cells, (names - cells, out)
    assert not any("…" in c for c in cells), out
    # the numbers stay whole too: each detector's rows (one per variant) hold its AUCs, as JSON has them
    for name in names:
        rows = [line.split() for line in out.splitlines() if line.startswith(name + " ")]
        aucs = [("-" if a is None else f"{a:.3f}") for v in report["variants"].values() if name in v["detectors"]
                for a in [v["detectors"][name]["auc"]]]
        assert [r[1] for r in rows] == aucs, (name, rows, aucs)


def test_bank_list_keeps_a_long_bank_name_whole(tmp_path: Path):
    data, img = tmp_path / "data", tmp_path / "known.jpg"
    picture(9, (320, 240)).save(img, quality=90)
    bank = "factcheckers-network-debunked-pictures-2026-q4-" + "x" * 17  # 64 characters: the longest name allowed
    subprocess.run([sys.executable, "-m", "streams.cli.__main__", "bank", "add", bank, str(img), "--verdict", "fake",
                    "-d", str(data)], check=True, capture_output=True, timeout=120)
    assert bank in _cells(_cli("bank", "list", "-d", str(data)).stdout)
