"""`deepwatch bank add` with files it cannot hash: a truncated JPEG has a
sound header, so a header check passed it and the add then stopped on it
with "nothing added ... (remove the file and run again)", even with
--skip-bad, and a folder with two bad files named one per run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import picture


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed, (320, 240)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _folder(root: Path) -> Path:
    """Two good pictures, a truncated JPEG (its header intact) and a file that is not a picture."""
    root.mkdir()
    (root / "good1.jpg").write_bytes(_jpeg(1))
    (root / "good2.jpg").write_bytes(_jpeg(2))
    whole = _jpeg(3)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "notapicture.png").write_bytes(b"not a picture")
    return root


def _banks(data: Path) -> dict[str, int]:
    r = _cli("bank", "list", "-d", str(data), "--format", "json")
    assert r.returncode == 0, r.stderr
    return {b["name"]: b["entries"] for b in json.loads(r.stdout)}


def test_without_skip_bad_every_bad_file_is_named_and_nothing_added(tmp_path: Path):
    imgs, data = _folder(tmp_path / "imgs"), tmp_path / "data"
    r = _cli("bank", "add", "b", str(imgs), "--verdict", "fake", "-d", str(data))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    # both bad files in one run, each on its own line with why; no good file blamed
    assert len(errors) == 2, r.stderr
    assert any(str(imgs / "truncated.jpg") in e and "truncated" in e for e in errors), errors
    assert any(str(imgs / "notapicture.png") in e for e in errors), errors
    assert "good" not in "\n".join(errors)
    assert "nothing added to 'b': 2 of 4 files unreadable" in r.stderr and "--skip-bad" in r.stderr
    assert "remove the file and run again" not in r.stderr
    assert _banks(data) == {}  # not even an empty bank left behind


def test_skip_bad_adds_the_rest_and_names_the_truncated_file(tmp_path: Path):
    imgs, data = _folder(tmp_path / "imgs"), tmp_path / "data"
    r = _cli("bank", "add", "b", str(imgs), "--verdict", "fake", "-d", str(data), "--skip-bad")
    assert r.returncode == 0, r.stderr
    skipped = [line for line in r.stderr.splitlines() if line.startswith("skipped ")]
    assert sorted(Path(line.split(": ")[0].removeprefix("skipped ")).name for line in skipped) == \
        ["notapicture.png", "truncated.jpg"], r.stderr
    assert "added 2 new images to 'b' (0 already there, 2 skipped)" in r.stderr
    assert _banks(data) == {"b": 2}

    # the good pictures really are in the bank: each is found by `similar`
    for name in ("good1.jpg", "good2.jpg"):
        r = _cli("similar", str(imgs / name), "-d", str(data), "--format", "json")
        assert r.returncode == 0, r.stderr
        assert [m["label"] for m in json.loads(r.stdout) if m["distance"] == 0] == [name]

    # run again: the two good ones are there already, the bad ones skipped again
    r = _cli("bank", "add", "b", str(imgs), "--verdict", "fake", "-d", str(data), "--skip-bad")
    assert r.returncode == 0 and "added 0 new images to 'b' (2 already there, 2 skipped)" in r.stderr, r.stderr
    assert _banks(data) == {"b": 2}


def test_store_hands_every_bad_file_over_and_adds_all_or_the_rest(tmp_path: Path):
    from detectors.banks import BankStore, ImagesRejected
    from detectors.imagedata import ImageRejected

    imgs = _folder(tmp_path / "imgs")
    files = sorted(imgs.iterdir())
    store = BankStore(tmp_path / "banks.sqlite")
    try:
        # the default is unchanged: the first file that cannot be hashed raises, nothing written
        with pytest.raises(ImageRejected):
            store.add_images("b", "fake", files)
        assert store.list_banks() == []

        seen: list[Path] = []
        bad: list[tuple[str, Exception]] = []
        with pytest.raises(ImagesRejected) as e:
            store.add_images("b", "fake", files, progress=seen.append, on_bad=lambda p, err: bad.append((p.name, err)))
        assert e.value.count == 2 and seen == files  # every file was tried, in order
        assert sorted(n for n, _ in bad) == ["notapicture.png", "truncated.jpg"]
        assert all(isinstance(err, ImageRejected) for _, err in bad)
        assert store.list_banks() == []  # rolled back

        bad.clear()
        assert store.add_images("b", "fake", files, on_bad=lambda p, err: bad.append((p.name, err)), keep_rest=True) == 2
        assert len(bad) == 2 and [b.entries for b in store.list_banks()] == [2]
    finally:
        store.close()
