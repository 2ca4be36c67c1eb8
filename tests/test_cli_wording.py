"""Wording a new user met in the CLI's output: `prune` printed its cutoff as
"2026-11-07T18:17:14.169177+00:00", counts read "1 pictures" or "1 new
image(s)", `--help` showed Python types (`<list[Path]>`) and `--format <str>`
without its two values, and `bank list` of a banks file holding no bank
printed an empty boxed table and nothing else."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.support import picture
from tests.test_retention import _data_dir


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPWATCH_")}
    r = subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True, timeout=120,
                       env={**env, "COLUMNS": "200"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.returncode, r.stderr)
    return r


def test_prune_says_its_cutoff_to_the_minute(tmp_path: Path):
    data_dir, _, _ = _data_dir(tmp_path)
    cutoff = json.loads(_cli("prune", "--older-than", "30d", "--dry-run", "-d", str(data_dir), "--json").stdout)["cutoff"]
    out = _cli("prune", "--older-than", "30d", "--dry-run", "-d", str(data_dir)).stdout
    m = re.search(r"stored or seen since (\d{4}-\d\d-\d\d \d\d:\d\d) UTC and ", out)
    assert m, out
    said = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
    assert timedelta(0) <= datetime.fromisoformat(cutoff) - said < timedelta(minutes=1)  # the cutoff, cut to the minute
    assert "+00:00" not in out and cutoff not in out
    assert re.search(r"^6 pictures: would delete 3 ", out), out
    assert "1 analysis records" not in out and "1 leftover temp files" not in out


def test_bank_add_counts_in_words(tmp_path: Path):
    for i in range(3):
        picture(i, (200, 150)).save(tmp_path / f"p{i}.jpg", quality=90)
    d = ("-d", str(tmp_path / "data"))
    r = _cli("bank", "add", "b", str(tmp_path / "p0.jpg"), "--verdict", "fake", *d)
    assert "added 1 new image to 'b' (0 already there)" in r.stderr, r.stderr
    r = _cli("bank", "add", "b", str(tmp_path / "p1.jpg"), str(tmp_path / "p2.jpg"), "--verdict", "fake", *d)
    assert "added 2 new images to 'b' (0 already there)" in r.stderr, r.stderr
    assert "(s)" not in r.stderr


def test_help_names_values_not_python_types():
    for command in (["models", "list"], ["eval"], ["train"], ["bank", "add"], ["bank", "import"], ["bank", "list"],
                    ["similar"], ["detect"], ["prune"], ["redeliver"], ["connect", "bluesky"],
                    ["connect", "mastodon"], ["desk-users", "list"]):
        text = _cli(*command, "--help").stdout
        options = text[text.index("Options:"):]  # arguments are typer's own rendering (see the report)
        assert not re.search(r"<(list|List)\[", options), (command, options)
        fmt = re.search(r"--format (\S+)", options)
        assert fmt is None or fmt.group(1) in ("table|json", "json|table", "<json|table>"), (command, fmt.group(0))
    assert "--verdict fake|authentic" in _cli("bank", "add", "--help").stdout
    assert "--timeline public|local|hashtag|user" in _cli("connect", "mastodon", "--help").stdout


def test_an_empty_bank_list_says_so_under_its_table(tmp_path: Path):
    from detectors.banks import BankStore

    BankStore(tmp_path / "banks.sqlite").close()  # a banks file holding no bank (as a refused first add leaves it)
    r = _cli("bank", "list", "-d", str(tmp_path))
    assert "bank" in r.stdout  # the table's head, as for a data dir without a banks file
    assert f"no banks in {tmp_path / 'banks.sqlite'} yet" in r.stderr and "bank add" in r.stderr
