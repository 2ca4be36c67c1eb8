"""A findings.sqlite this user may not read and write, in a directory it may
write: the error said "it must be a file in a writable directory", which sent
people to the directory, the one thing that was fine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.desk_support import small_store


def _without_root_powers() -> list[str]:
    """Root opens any file whatever its mode: run the CLI as root without the
    capabilities that override file permissions, as a plain user would be."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.parametrize("command", [["clusters"], ["alerts"]])
def test_an_unreadable_findings_file_is_named_with_the_fix(tmp_path: Path, command: list[str]):
    data = tmp_path / "data"
    small_store(data)
    store = data / "findings.sqlite"
    store.chmod(0o000)
    try:
        r = subprocess.run([*_without_root_powers(), sys.executable, "-m", "streams.cli", *command, "-d", str(data)],
                           capture_output=True, text=True, timeout=120)
    finally:
        store.chmod(0o600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    [line] = [x for x in r.stderr.splitlines() if x.strip()]
    assert line.startswith("error: ") and str(store) in line, line
    assert "may not read and write the file" in line and "----------" in line and "chmod u+rw" in line, line
    assert "writable directory" not in line, line  # the directory is writable: not what to fix
    assert os.access(data, os.W_OK)
