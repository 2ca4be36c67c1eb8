"""`deepwatch desk-users list|remove`: docs/desk.md said removing a desk user
takes effect on their open sessions, but the only CLI was `desk-user`, which
creates or replaces one; removing meant hand-editing desk-users.json. Run
here as a person would: the CLI in subprocesses, against a real `deepwatch
serve`."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx

from tests.desk_support import DeskServer, small_store

PASSWORD = "correct horse battery"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli.__main__", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DESK_PW": PASSWORD, "COLUMNS": "120"})


def _ok(*args: str) -> subprocess.CompletedProcess:
    r = _cli(*args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.returncode, r.stderr)
    return r


def _log_in(desk: DeskServer, name: str) -> tuple[httpx.Client, httpx.Response]:
    """The login form as a browser sends it: its CSRF token, its cookie, then the POST."""
    c = httpx.Client(base_url=desk.url, timeout=30, follow_redirects=True)
    page = c.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"username": name, "password": PASSWORD, "csrf": token})
    return c, r


def _whoami(c: httpx.Client) -> str | None:
    m = re.search(r'<span id="whoami">([^<]*)</span>', c.get("/").text)
    return m.group(1) if m else None


def test_add_list_remove_and_the_removed_user_can_no_longer_log_in(tmp_path: Path):
    data = tmp_path / "data"
    small_store(data)
    d = ("-d", str(data))
    r = _ok("desk-users", "list", *d)
    assert r.stdout == "" and "no desk users" in r.stderr and "desk-user NAME" in r.stderr
    assert json.loads(_ok("desk-users", "list", *d, "--json").stdout) == []
    _ok("desk-user", "erin", "--role", "editor", "--password-env", "DESK_PW", *d)
    _ok("desk-user", "vic", "--role", "viewer", "--password-env", "DESK_PW", *d)

    assert json.loads(_ok("desk-users", "list", *d, "--format", "json").stdout) == [
        {"name": "erin", "role": "editor"}, {"name": "vic", "role": "viewer"}]
    table = _ok("desk-users", "list", *d).stdout
    assert re.search(r"erin\s.*editor", table) and re.search(r"vic\s.*viewer", table)
    users_file = (data / "desk-users.json").read_text()
    hashes = [u["password"] for u in json.loads(users_file)["users"]]
    listed = _ok("desk-users", "list", *d).stdout + _ok("desk-users", "list", *d, "--json").stdout
    assert all(h.split("$")[-1] not in listed and h.split("$")[-2] not in listed for h in hashes)  # no secrets

    desk = DeskServer(data)
    try:
        vic, r = _log_in(desk, "vic")
        assert r.status_code == 200 and _whoami(vic) == "vic (viewer)", r.text[-500:]
        erin, _ = _log_in(desk, "erin")
        assert _whoami(erin) == "erin (editor)"

        r = _cli("desk-users", "remove", "nosuch", *d)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "no desk user 'nosuch'" in r.stderr and "erin, vic" in r.stderr  # who is there, to pick from
        r = _ok("desk-users", "remove", "vic", *d)
        assert "removed vic" in r.stderr

        assert json.loads(_ok("desk-users", "list", *d, "--json").stdout) == [{"name": "erin", "role": "editor"}]
        assert stat.S_IMODE((data / "desk-users.json").stat().st_mode) == 0o600  # as desk-user writes it

        # the running desk: vic's open session has ended, and vic's password no longer logs in
        assert _whoami(vic) is None
        again, r = _log_in(desk, "vic")
        assert r.status_code == 401 and "wrong user name or password" in r.text
        assert _whoami(again) is None
        # the other user is untouched: still logged in, and can log in again
        assert _whoami(erin) == "erin (editor)"
        assert _whoami(_log_in(desk, "erin")[0]) == "erin (editor)"
        for c in (vic, erin, again):
            c.close()
    finally:
        desk.stop()

    r = _cli("desk-users", "remove", "vic", *d)  # twice: said, not a silent success
    assert r.returncode == 2 and "no desk user 'vic'" in r.stderr


def test_remove_without_a_users_file_and_with_a_broken_one_is_one_line(tmp_path: Path):
    r = _cli("desk-users", "remove", "erin", "-d", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no desk user 'erin'" in r.stderr and "desk-user" in r.stderr
    assert not (tmp_path / "desk-users.json").exists()  # nothing created

    broken = '{"users": [{"name": "x", "role": "root", "password": "p"}]}'
    (tmp_path / "desk-users.json").write_text(broken)
    for args in (("remove", "x"), ("list",)):
        r = _cli("desk-users", *args, "-d", str(tmp_path))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "desk-users.json is not valid" in r.stderr
    assert (tmp_path / "desk-users.json").read_text() == broken  # left as it was
