"""The rest of the data dir is owner-only too (``tests/test_private_files.py``
covers the stores and logs): at umask 0022 a replay left ``blobs/`` (its
shard directories, so the sha256 of every picture seen, and ``analysis/``),
``faust/`` and ``desk/`` 0755 and the workers' ``logs/*.port`` and the desk's
thumbnails 0644. Now each directory deepwatch makes for them is 0700, each
file it writes there 0600 from its first byte, and ``blobs/``, ``faust/`` and
``desk/thumbs`` found wider are narrowed when this process owns them
(``streams.private_files.own_dir``). The pictures and analyses were 0600
already (``mkstemp``): that is pinned here too."""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import pytest

from tests.desk_support import jpeg
from tests.support import mode_of, picture
from tests.test_private_files import replay_two_pictures

def _reachable(root: Path, path: Path) -> bool:
    """Whether group or other may search every directory from ``root`` down to ``path``'s parent."""
    d = path.parent
    while True:
        if not mode_of(d) & 0o011:
            return False
        if d == root:
            return True
        d = d.parent


def readable_by_others(root: Path) -> list[str]:
    """Paths under ``root`` (a directory other users may enter) that another
    local user can read: listed, for a directory; its bytes, for a file."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if _reachable(root, p) and mode_of(p) & 0o044)


def test_a_replay_into_a_users_0755_data_dir_leaves_nothing_there_for_other_users(tmp_path, umask_022):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # the user's own, kept as it is: what is under it must protect itself
    # as an earlier deepwatch left them, at the umask's modes
    (data / "blobs" / "ab" / "cd").mkdir(parents=True)
    (data / "faust").mkdir()
    (data / "logs").mkdir()
    (data / "logs" / "worker-pipeline-0-1.log").write_text("an older run's log\n")  # 0644, never opened again
    replay_two_pictures(tmp_path, data)
    assert mode_of(data) == 0o755
    assert readable_by_others(data) == []  # the runners' lock too: one another user could open, it could flock
    files = {p: mode_of(p) for p in data.rglob("*") if p.is_file()}
    assert {str(p.relative_to(data)) for p, m in files.items() if m != 0o600} == {"logs/worker-pipeline-0-1.log"}
    blobs = [p for p in files if p.parent.parent.parent.name == "blobs"]
    analyses = [p for p in files if p.parent.name == "analysis"]
    ports = [p for p in files if p.suffix == ".port"]
    assert len(blobs) == 2 and len(analyses) == 2 and ports  # the files looked at are there
    # each directory deepwatch made (the one found wider: its top narrowed) is 0700;
    # Faust's own under faust/<app>/ keep the umask's mode: faust/ 0700 hides them
    ours = [data / "blobs", data / "blobs" / "analysis", data / "faust", data / "faust" / "deepwatch", data / "logs",
            *{p.parent for p in blobs}, *{p.parent.parent for p in blobs}]
    assert {str(d.relative_to(data)): oct(mode_of(d)) for d in ours if mode_of(d) != 0o700} == {}
    assert mode_of(data / "blobs" / "ab" / "cd") == 0o755  # not walked: blobs/ 0700 hides it


def test_a_blob_store_makes_its_directories_0700_and_its_files_0600(tmp_path, umask_022):
    from streams.blobstore import DirectoryBlobStore

    root = tmp_path / "new" / "blobs"
    store = DirectoryBlobStore(root)
    sha = store.put(b"picture bytes")
    path = store._path(sha)
    assert mode_of(path) == 0o600
    assert [mode_of(d) for d in (tmp_path / "new", root, path.parent.parent, path.parent)] == [0o700] * 4
    assert store.put(b"picture bytes") == sha and mode_of(path) == 0o600  # stored again: as it was


def test_the_analysis_cache_is_0700_and_its_files_0600(tmp_path, umask_022):
    import streams.analyze as analyze
    from streams.blobstore import DirectoryBlobStore
    from streams.settings import Settings

    analyzer = analyze.Analyzer(Settings(data_dir=tmp_path), tmp_path / "blobs")
    buf = io.BytesIO()
    picture(3, (200, 150)).save(buf, "JPEG", quality=85)
    sha = DirectoryBlobStore(tmp_path / "blobs").put(buf.getvalue())
    analyzer._analyse(buf.getvalue(), sha)
    path = analyze.analysis_path(tmp_path / "blobs", sha)
    assert mode_of(path) == 0o600 and mode_of(path.parent) == 0o700 and mode_of(tmp_path / "blobs") == 0o700


def test_the_desks_thumbnails_are_0600_in_a_0700_cache_under_a_0700_desk_dir(tmp_path, umask_022):
    from streams.blobstore import DirectoryBlobStore
    from streams.desk.thumbs import Thumbnails

    sha = DirectoryBlobStore(tmp_path / "blobs").put(jpeg(picture(1, (300, 200))))
    cache = tmp_path / "desk" / "thumbs"
    thumbs = Thumbnails(tmp_path / "blobs", cache, max_bytes=10**7, max_pixels=10**8)
    thumbs.get(sha, 96)
    [made] = cache.glob("*.jpg")
    assert mode_of(made) == 0o600 and mode_of(cache) == 0o700 and mode_of(tmp_path / "desk") == 0o700


def test_fausts_directory_is_0700_before_the_app_starts_and_narrowed_when_made_wider(tmp_path, umask_022):
    from streams.faust_app import faust_app
    from streams.settings import Settings

    (tmp_path / "faust").mkdir(mode=0o755)
    app = faust_app("probe", Settings(data_dir=tmp_path), "kafka://127.0.0.1:9")
    assert Path(app.conf.datadir).parent == tmp_path / "faust"
    assert mode_of(tmp_path / "faust") == 0o700 and mode_of(tmp_path / "faust" / "probe") == 0o700


def test_own_dir_narrows_its_own_directory_only_and_warns_for_another_users(tmp_path, umask_022, caplog):
    from streams.private_files import own_dir

    mine = tmp_path / "blobs"
    (mine / "ab").mkdir(parents=True, mode=0o755)
    os.chmod(mine, 0o755)
    assert own_dir(mine, "blob store") == mine
    assert mode_of(mine) == 0o700 and mode_of(mine / "ab") == 0o755
    os.chmod(mine, 0o750)
    own_dir(mine, "blob store")
    assert mode_of(mine) == 0o700
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(FileExistsError):
        own_dir(tmp_path / "f", "blob store")
    assert stat.S_ISREG((tmp_path / "f").stat().st_mode)
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    caplog.clear()  # the narrowing of ``mine`` above is said too
    with caplog.at_level(logging.WARNING, logger="streams.private_files"):
        assert own_dir(theirs, "blob store") == theirs  # still used
    assert mode_of(theirs) == 0o755
    [said] = [r.getMessage() for r in caplog.records]
    assert "cannot make the blob store" in said and "owned by uid 65534" in said and "drwxr-xr-x" in said
