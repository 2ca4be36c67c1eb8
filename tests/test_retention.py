"""Blob retention (``streams.retention``, ``deepwatch prune``): which stored
pictures go, which stay, and that the findings store is the one that says
which clusters still spread (SQLite and the Elasticsearch fake alike)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from streams import es_templates as T
from streams.analyze import analysis_path
from streams.blobstore import DirectoryBlobStore
from streams.retention import _remove_unless_stored, prune
from streams.store import open_store
from tests.findings_fixture import SHA, fill

DAY = 86400.0
OLD = time.time() - 40 * DAY  # older than the 30-day period the tests use


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (seed * 40 % 256, 90, 200)).save(out, "JPEG")
    return out.getvalue()


def _age(path: Path, when: float = OLD) -> None:
    os.utime(path, (when, when))


def _age_clusters(store, *, except_: str | None = None) -> None:
    """Every cluster last written 40 days ago, but ``except_``: the clock the
    sink writes ``updated_at`` with cannot be moved, so the test moves the rows."""
    old = datetime.fromtimestamp(OLD, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    store._db.execute("UPDATE clusters SET updated_at = ? WHERE cluster_id IS NOT ?", (old, except_))
    store._db.commit()


@pytest.mark.parametrize("backend", ["sqlite", "es"])
def test_the_store_names_the_members_of_clusters_written_since(backend, fake_es, tmp_path):
    from streams.es_store import EsFindingsStore
    from streams.settings import Settings

    store = (open_store(tmp_path) if backend == "sqlite"
             else EsFindingsStore.from_url(fake_es.url.replace("http://", "es://"), settings=Settings()))
    try:
        fill(store)
        now = datetime.now(timezone.utc)
        assert store.member_shas_updated_since(now - timedelta(hours=1)) == set(SHA.values())
        assert store.member_shas_updated_since(now + timedelta(hours=1)) == set()
        # c-flood2 was merged into c-flood: when only the survivor is written
        # since, the merged-away cluster's picture is one of its members too
        if backend == "sqlite":
            _age_clusters(store, except_="c-flood")
        else:
            for doc in fake_es.docs[T.concrete("deepwatch-clusters")].values():
                if doc["cluster_id"] != "c-flood":
                    doc["updated_at"] = "2026-01-01T00:00:00.000000Z"
        assert store.member_shas_updated_since(now - timedelta(hours=1)) == {SHA["c"], SHA["d"]}
    finally:
        store.close()


def _data_dir(tmp_path: Path) -> tuple[Path, DirectoryBlobStore, dict[str, str]]:
    """A data dir whose findings name pictures a-d (``findings_fixture``),
    all of their clusters last written 40 days ago but c-flood's (which
    holds c, and d through the merge), and blobs: a-d plus ``loose`` (in no
    cluster) and ``fresh`` (in no cluster, stored now)."""
    store = open_store(tmp_path)
    fill(store)
    _age_clusters(store, except_="c-flood")
    store.close()
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    shas = {}
    for i, name in enumerate(("a", "b", "c", "d", "loose", "fresh")):
        data = _jpeg(i)
        sha = SHA.get(name) or blobs.put(data)
        if name in SHA:  # the fixture's digests: file them under those names
            path = blobs._path(sha)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        shas[name] = sha
        if name != "fresh":
            _age(blobs._path(sha))
    return tmp_path, blobs, shas


def test_prune_deletes_pictures_neither_seen_nor_in_a_spreading_cluster(tmp_path):
    data_dir, blobs, shas = _data_dir(tmp_path)
    root = data_dir / "blobs"
    analysis = analysis_path(root, shas["b"])
    analysis.parent.mkdir(parents=True, exist_ok=True)
    analysis.write_text("{}")
    kept_analysis = analysis_path(root, shas["c"])
    kept_analysis.write_text("{}")
    stale_version = root / "analysis" / f"{shas['c']}.v1.h1.json"  # a version no worker reads
    stale_version.write_text("{}")
    leftover = blobs._path(shas["a"]).with_name(f".{shas['a']}.abc123.tmp")  # a write a crash interrupted
    leftover.write_bytes(b"x" * 10)
    for p in (analysis, kept_analysis, stale_version, leftover):
        _age(p)
    current = analysis_path(root, "x").name[1:]

    store = open_store(data_dir)
    try:
        dry = prune(root, store, 30 * DAY, dry_run=True, current_analysis=lambda n: n.endswith(current))
        assert all(blobs.exists(s) for s in shas.values()) and analysis.exists() and leftover.exists()
        report = prune(root, store, 30 * DAY, current_analysis=lambda n: n.endswith(current))
    finally:
        store.close()
    assert {k: v for k, v in dry.as_json().items() if k not in ("dry_run", "cutoff")} == \
        {k: v for k, v in report.as_json().items() if k not in ("dry_run", "cutoff")}
    gone = {name for name, sha in shas.items() if not blobs.exists(sha)}
    assert gone == {"a", "b", "loose"}  # c and d: c-flood spreads; fresh: stored now
    assert (report.blobs, report.deleted, report.kept_recent, report.kept_active) == (6, 3, 1, 2)
    assert not analysis.exists() and not stale_version.exists() and kept_analysis.exists()
    assert report.analyses_deleted == 2 and report.leftovers_deleted == 1 and not leftover.exists()
    assert report.deleted_bytes == sum(len(_jpeg(i)) for i in (0, 1, 4)) + 2 * 2 + 10


def test_a_repost_refreshes_its_blob_and_a_deleted_one_is_stored_again(tmp_path):
    blobs = DirectoryBlobStore(tmp_path)
    data = _jpeg(7)
    sha = blobs.put(data)
    path = blobs._path(sha)
    _age(path)
    blobs.put(data, sha)  # the same picture posted again
    assert path.stat().st_mtime > time.time() - 60
    path.unlink()  # pruned meanwhile
    blobs.put(data, sha)
    assert path.read_bytes() == data


def test_a_picture_stored_again_while_pruning_is_put_back(tmp_path):
    blobs = DirectoryBlobStore(tmp_path)
    sha = blobs.put(_jpeg(3))
    path = blobs._path(sha)
    cutoff = time.time() - 30 * DAY
    # stored again after the prune's first look, before its deletion: the moved file's mtime says so
    assert _remove_unless_stored(path, cutoff) is None
    assert path.exists() and not list(path.parent.glob(".*"))
    _age(path)
    assert _remove_unless_stored(path, cutoff) == len(_jpeg(3)) and not path.exists()
    assert _remove_unless_stored(path, cutoff) is None  # already gone: nothing to do


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", "prune", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, timeout=120)


def test_cli_prune_reports_in_json_and_deletes_only_without_dry_run(tmp_path):
    data_dir, blobs, shas = _data_dir(tmp_path)
    dry = _cli("--older-than", "30d", "--dry-run", "-d", str(data_dir), "--format", "json", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True and doc["deleted"] == 3 and all(blobs.exists(s) for s in shas.values())
    real = _cli("--older-than", "720h", "-d", str(data_dir), cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    assert "6 pictures: deleted 3" in real.stdout and "kept 1 stored or seen since" in real.stdout
    assert not blobs.exists(shas["loose"]) and blobs.exists(shas["c"])


@pytest.mark.parametrize("period, says", [
    ("30", "not a period: write days or hours, e.g. 30d or 36h"),
    ("5m", "not a period"),
    ("0.5h", "under an hour"),
])
def test_cli_prune_refuses_a_period_it_cannot_read_in_one_line(tmp_path, period, says):
    data_dir, blobs, shas = _data_dir(tmp_path)
    r = _cli("--older-than", period, "-d", str(data_dir), cwd=tmp_path)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert all(blobs.exists(s) for s in shas.values())


def test_cli_prune_names_a_data_dir_without_blobs(tmp_path):
    r = _cli("--older-than", "30d", "-d", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert r.returncode == 2 and "no blob store at" in r.stderr and "--data-dir" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "nowhere").exists()


def test_the_analyze_stage_stores_a_repost_again_once_it_stored_it_longer_ago_than_it_remembers(tmp_path, monkeypatch):
    import streams.stage as stage_mod
    from streams.retention import _blob_files
    from tests.test_blob_hold import _event, _process, _stage

    stage = _stage(tmp_path)
    _process(stage, _event(0, "small.png"))
    [path] = list(_blob_files(tmp_path / "blobs"))
    path.unlink()  # pruned
    _process(stage, _event(1, "small.png"))
    assert not path.exists()  # a repost moments later skips the blob store
    monkeypatch.setattr(stage_mod, "BLOB_REMEMBERED_S", 0.0)
    _process(stage, _event(2, "small.png"))
    assert path.exists()  # ... and once remembered longer than that, stores it (again)
