"""`deepwatch bank add|import|list` and `similar` on a data dir or banks file
they cannot use: one line naming the file and the fix, never a traceback.

A data dir the user may not write (a finished run shared read-only) ended
`bank list` on ``sqlite3.OperationalError: unable to open database file``:
listing opened the banks file for writing, and so created it. A findings
store copied to banks.sqlite was silently written into. And the bank
commands took no --config, though the settings reference says every command
does."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import picture

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534


def _cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, as_nobody: bool = False,
         timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; ``as_nobody``: as an unprivileged user when this
    runs as root (root writes anywhere), through setpriv as one would by hand."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    prefix: list[str] = []
    if as_nobody and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot run the CLI as an unprivileged user")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run([*prefix, sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**base, "PYTHONPATH": str(ROOT), **(env or {})})


def _ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _images(d: Path, *seeds: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        picture(s, (200, 150)).save(d / f"p{s}.jpg", quality=90)
    return d


def _csv(path: Path) -> Path:
    path.write_text("id,pdq,label\n1," + "ab" * 32 + ",x.jpg\n")
    return path


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------ defect 1: a data dir that cannot be written


def test_bank_list_of_a_data_dir_that_does_not_exist_creates_nothing(tmp_path):
    missing = tmp_path / "nodir"
    r = _ok(_cli("bank", "list", "--data-dir", str(missing), "--format", "json"))
    assert json.loads(r.stdout) == []
    assert "no banks in" in r.stderr and "bank add" in r.stderr  # says why the list is empty
    assert not missing.exists()  # was nodir/banks.sqlite: a listing made the dir and an empty banks file
    r = _ok(_cli("bank", "list", "--data-dir", str(missing)))
    assert "bank" in r.stdout and not missing.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc: a directory no user may create files in")
def test_a_data_dir_nobody_may_write_lists_empty_and_refuses_writes_in_one_line(tmp_path):
    # /proc/self: a directory in which no one, root included, can create banks.sqlite
    r = _ok(_cli("bank", "list", "--data-dir", "/proc/self", "--format", "json"))
    assert json.loads(r.stdout) == []  # was: sqlite3.OperationalError: unable to open database file
    line = _one_error_line(_cli("bank", "add", "x", "--verdict", "fake", str(_images(tmp_path / "imgs", 1)),
                                "--data-dir", "/proc/self"))
    assert "/proc/self/banks.sqlite" in line and "--data-dir" in line and "nothing added" in line, line
    line = _one_error_line(_cli("bank", "import", "x", str(_csv(tmp_path / "h.csv")), "--data-dir", "/proc/self"))
    assert "/proc/self/banks.sqlite" in line and "--data-dir" in line, line


@pytest.fixture
def shared_dir():
    """A directory another user can reach (pytest's tmp_path is private to
    its owner): the read-only tests run the CLI as ``nobody`` when root."""
    d = Path(tempfile.mkdtemp(prefix="deepwatch-ro-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:  # write permission back, so the tree can go
        if p.is_dir():
            p.chmod(0o755)
    shutil.rmtree(d)


def test_banks_in_a_read_only_data_dir_list_and_writes_say_how_to_fix(shared_dir):
    data = shared_dir / "data"
    imgs = _images(shared_dir / "imgs", 1, 2)
    _ok(_cli("bank", "add", "afp", "--verdict", "fake", str(imgs / "p1.jpg"), "--data-dir", str(data)))
    if os.geteuid() == 0 and _cli("--help", as_nobody=True).returncode != 0:
        pytest.skip("the checkout is not readable by an unprivileged user")
    for p in (imgs, *imgs.iterdir(), _csv(shared_dir / "h.csv")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    before = _tree(data)
    for p in data.rglob("*"):
        p.chmod(0o555 if p.is_dir() else 0o444)
    data.chmod(0o555)  # a finished run shared read-only
    env = {"HOME": str(shared_dir)}

    r = _ok(_cli("bank", "list", "--data-dir", str(data), "--format", "json", env=env, as_nobody=True))
    assert json.loads(r.stdout) == [{"name": "afp", "verdict": "fake", "entries": 1}]

    line = _one_error_line(_cli("bank", "add", "afp", "--verdict", "fake", str(imgs / "p2.jpg"), "--data-dir", str(data),
                                env=env, as_nobody=True))
    assert str(data / "banks.sqlite") in line and "--data-dir" in line and "nothing added" in line, line
    assert "p2.jpg" not in line  # the banks file failed, not the picture
    line = _one_error_line(_cli("bank", "import", "afp", str(shared_dir / "h.csv"), "--data-dir", str(data),
                                env=env, as_nobody=True))
    assert str(data / "banks.sqlite") in line and "--data-dir" in line, line
    assert _tree(data) == before  # nothing created (no journal left behind)


def test_a_write_error_names_the_banks_file_not_a_picture(tmp_path):
    # the store opened, then a write failed: add_images rolled back and raised a
    # bare sqlite3.OperationalError, and the CLI printed a traceback
    from detectors.banks import BankFileError, BankStore

    imgs = _images(tmp_path / "imgs", 1)
    store = BankStore(tmp_path / "banks.sqlite")
    store.add_images("afp", "fake", [imgs / "p1.jpg"])
    store.close()
    reader = BankStore(tmp_path / "banks.sqlite", read_only=True)
    try:
        assert [b.name for b in reader.list_banks()] == ["afp"]
        with pytest.raises(BankFileError, match="cannot write banks file .*banks.sqlite"):
            reader.import_csv("afp", _csv(tmp_path / "h.csv"), "fake")
    finally:
        reader.close()
    assert [b.entries for b in BankStore(tmp_path / "banks.sqlite").list_banks()] == [1]


def test_a_read_only_store_reads_a_banks_file_from_before_the_newer_columns(tmp_path):
    # no migration when reading only: the columns added since read as empty
    path = tmp_path / "banks.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE banks (name TEXT PRIMARY KEY, verdict TEXT NOT NULL);"
                     "CREATE TABLE entries (rowid INTEGER PRIMARY KEY AUTOINCREMENT, bank TEXT NOT NULL, entry_id TEXT NOT NULL,"
                     " label TEXT, phash TEXT, pdq TEXT, pdq_quality INTEGER, sha256 TEXT);"
                     "INSERT INTO banks VALUES ('old', 'fake');"
                     f"INSERT INTO entries (bank, entry_id, pdq, pdq_quality) VALUES ('old', '1', '{'ab' * 32}', 100);")
    db.commit()
    db.close()
    before = path.read_bytes()
    from detectors.banks import BankStore
    from detectors.hashing import ImageHashes

    store = BankStore(path, read_only=True)
    try:
        assert [(b.name, b.entries) for b in store.list_banks()] == [("old", 1)]
        found = store.match(ImageHashes(phash="0" * 16, pdq="ab" * 32, pdq_quality=100))
        assert [(m.bank, m.via) for m in found] == [("old", "pdq")]
    finally:
        store.close()
    assert path.read_bytes() == before


# ------------------------------------------------------------ defect 2: a banks file of the wrong kind


def _findings_as_banks(data: Path) -> bytes:
    from streams.store import SqliteFindingsStore

    data.mkdir(parents=True, exist_ok=True)
    SqliteFindingsStore(data / "banks.sqlite").close()  # a findings store copied over banks.sqlite
    return (data / "banks.sqlite").read_bytes()


def test_a_findings_store_named_banks_sqlite_is_refused_not_written_into(tmp_path):
    data = tmp_path / "data"
    before = _findings_as_banks(data)
    img = _images(tmp_path / "imgs", 1) / "p1.jpg"
    for args in (["bank", "list"], ["bank", "list", "--format", "json"],
                 ["bank", "add", "x", "--verdict", "fake", str(img)],
                 ["bank", "import", "x", str(_csv(tmp_path / "h.csv"))],
                 ["similar", str(img)], ["detect", str(img)],
                 ["serve", "--port", "0"]):  # the desk, at start: its lookups answered 500
        line = _one_error_line(_cli(*args, "--data-dir", str(data), timeout=60))
        # was: an empty listing, exit 0; add and import created bank tables inside it
        assert "banks.sqlite is not a deepwatch banks file" in line and "clusters" in line, (args, line)
        assert "move it aside" in line
    assert (data / "banks.sqlite").read_bytes() == before


def test_bank_store_refuses_another_programs_database_and_takes_an_empty_file(tmp_path):
    from detectors.banks import BankFileError, BankStore

    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE notes (body TEXT)")
    db.commit()
    db.close()
    for read_only in (False, True):
        with pytest.raises(BankFileError, match=r"is not a deepwatch banks file \(its tables: notes\)"):
            BankStore(other, read_only=read_only)
    db = sqlite3.connect(other)
    assert [n for n, in db.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["notes"]
    db.close()

    empty = tmp_path / "empty.sqlite"
    empty.touch()  # an empty file is a new banks file
    assert BankStore(empty, read_only=True).list_banks() == []
    store = BankStore(empty)
    assert store.list_banks() == []
    store.close()
    with pytest.raises(BankFileError, match="no banks file at"):
        BankStore(tmp_path / "missing.sqlite", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_worker_keeps_working_and_logs_why_a_wrong_banks_file_is_not_used(tmp_path, caplog):
    from streams.analyze import Analyzer
    from streams.records import ImageEvent, SourceRef
    from streams.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    before = _findings_as_banks(settings.data_dir)
    img = _images(tmp_path / "imgs", 1) / "p1.jpg"
    event = ImageEvent.model_validate({"event_id": "e1", "platform": "x", "account_id": "a",
                                       "posted_at": "2026-12-01T10:00:00Z", "image": {"url": "https://img.example/1.jpg"}})
    with caplog.at_level(logging.WARNING, logger="streams.analyze"):
        seen = Analyzer(settings, tmp_path / "blobs").analyze(event, img.read_bytes(), SourceRef(topic="t", partition=0, offset=0))
    assert seen.hashes is not None and not [e for e in seen.evidence if e.kind == "bank"]
    warned = [r for r in caplog.records if "bank reload failed" in r.getMessage()]
    assert warned and "is not a deepwatch banks file" in warned[0].__dict__["error"]
    assert (settings.data_dir / "banks.sqlite").read_bytes() == before


# ------------------------------------------------------------ defect 3: --config


def test_bank_commands_and_similar_take_config(tmp_path):
    data = tmp_path / "from-config"
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text(f"data_dir = {json.dumps(str(data))}\n")
    imgs = _images(tmp_path / "imgs", 1)
    _ok(_cli("bank", "add", "afp", "--verdict", "fake", str(imgs), "--config", str(cfg)))
    _ok(_cli("bank", "import", "te", str(_csv(tmp_path / "h.csv")), "-c", str(cfg)))
    listed = json.loads(_ok(_cli("bank", "list", "-c", str(cfg), "--format", "json")).stdout)
    assert listed == [{"name": "afp", "verdict": "fake", "entries": 1}, {"name": "te", "verdict": "fake", "entries": 1}]
    found = json.loads(_ok(_cli("similar", str(imgs / "p1.jpg"), "--config", str(cfg))).stdout)
    assert [(f["bank"], f["distance"]) for f in found] == [("afp", 0)]
    assert (data / "banks.sqlite").is_file()
