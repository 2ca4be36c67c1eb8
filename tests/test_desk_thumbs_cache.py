"""The desk's thumbnail cache keeps an exact count of its bytes on disk (the
size bound is enforced from that count), makes a thumbnail missed by several
requests at once only once, and a write that fails (a full disk) leaves no
temp file behind and still serves the thumbnail."""

from __future__ import annotations

import threading
import time

from streams.blobstore import DirectoryBlobStore
from streams.desk import thumbs
from streams.desk.thumbs import Thumbnails
from tests.desk_support import jpeg
from tests.support import picture


def on_disk(cache):
    return sum(p.stat().st_size for p in cache.glob("*.jpg"))


def setup(tmp_path, n=1, max_bytes=10**7):
    blobs = DirectoryBlobStore(tmp_path / "blobs")
    shas = [blobs.put(jpeg(picture(i, (300, 200)))) for i in range(n)]
    return shas, Thumbnails(tmp_path / "blobs", tmp_path / "cache", max_bytes=max_bytes, max_pixels=10**8)


def race(t, sha, px, n):
    """n threads miss the same thumbnail together: the first is still making
    it when the others ask. Returns how many times it was made."""
    make = t._make
    made = []

    def slow_make(*args):
        made.append(args)
        time.sleep(0.3)
        return make(*args)

    t._make = slow_make
    errors = []

    def fetch():
        try:
            t.get(sha, px)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t._make = make
    assert not errors
    return len(made)


def test_concurrent_misses_of_one_thumbnail_make_it_once(tmp_path):
    (sha,), t = setup(tmp_path)
    assert race(t, sha, 128, 8) == 1
    assert t.misses == 1 and t.hits == 7
    assert len(list((tmp_path / "cache").glob("*.jpg"))) == 1
    assert t.cache_bytes() == on_disk(tmp_path / "cache") > 0


def test_renames_onto_one_thumbnail_are_counted_once(tmp_path):
    # Two desks on one cache (a restart over a running one) can both write a
    # thumbnail: over-counting the second rename once pushed the count past
    # the bound for good, and every later miss emptied the cache.
    (sha,), t = setup(tmp_path)
    data = t._make(sha, 128)
    path = tmp_path / "cache" / f"{sha}-128.jpg"
    barrier = threading.Barrier(8)

    def store():
        barrier.wait(timeout=10)
        t._store(path, data)

    threads = [threading.Thread(target=store) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert t.cache_bytes() == on_disk(tmp_path / "cache") == len(data)


def test_concurrent_misses_do_not_make_the_cache_evict_everything(tmp_path):
    shas, t = setup(tmp_path, n=6)
    size = len(t.get(shas[0], 128))
    (tmp_path / "cache" / f"{shas[0]}-{t.snap(128)}.jpg").unlink()
    t = Thumbnails(tmp_path / "blobs", tmp_path / "cache", max_bytes=int(size * 3.5), max_pixels=10**8)
    for s in shas[:4]:
        race(t, s, 128, 6)
        assert t.cache_bytes() == on_disk(tmp_path / "cache") <= t.max_bytes
    t.get(shas[4], 128)
    t.get(shas[5], 128)
    assert t.cache_bytes() == on_disk(tmp_path / "cache") <= t.max_bytes
    assert len(list((tmp_path / "cache").glob("*.jpg"))) >= 2
    hits = t.hits
    t.get(shas[5], 128)
    assert t.hits == hits + 1


def test_a_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    (sha,), t = setup(tmp_path)

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(thumbs.os, "replace", full)
    assert t.get(sha, 128).startswith(b"\xff\xd8")  # shown all the same, only not cached
    assert list((tmp_path / "cache").iterdir()) == []
    assert t.cache_bytes() == 0


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    (sha,), t = setup(tmp_path)
    write_bytes = thumbs.Path.write_bytes

    def half_written(self, data):
        write_bytes(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(thumbs.Path, "write_bytes", half_written)
    assert t.get(sha, 128).startswith(b"\xff\xd8")
    assert list((tmp_path / "cache").iterdir()) == []
    assert t.cache_bytes() == 0
    monkeypatch.undo()
    assert len(t.get(sha, 128)) == t.cache_bytes() == on_disk(tmp_path / "cache")
