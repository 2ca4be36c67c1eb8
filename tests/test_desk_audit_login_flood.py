"""Password checks under a flood of logins, after an audit, on a real
``deepwatch serve`` over a real SQLite findings store: each check is scrypt
(32 MiB and ~0.1 s of a core), and they ran in the request threads, as many
at once as guesses arrived. 19 wrong logins at once from one address (the
rate limit allows 20 a minute) took the desk from 120 MB to 666 MB, and from
many addresses they would hold all 40 threads every page needs. They run a
few at a time now; the rest wait without a thread."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx

from streams.desk.auth import add_user
from streams.desk.state import PASSWORD_CHECKS
from tests.desk_support import DeskServer, small_store

PASSWORD = "correct horse battery"
SCRYPT_MIB = 32
# A guess waits its turn for as long as the checks ahead of it take (about 19 / PASSWORD_CHECKS of them):
# that wait is the throttle working, not a fault, and it took over httpx's default 5 s read timeout on a
# loaded machine. Connecting and sending are not queued and keep a bound.
WAIT_THEIR_TURN = httpx.Timeout(10.0, read=None)
# Past this the desk has lost a guess (the read above has no bound of its own); some 10x the slowest
# flood seen, under 3 busy processes on 2 cores.
HUNG_S = 60


def peak_rss_mib(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) // 1024


def log_in(url: str, name: str, password: str, timeout: httpx.Timeout | float = 5.0) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=timeout) as browser:
        csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/login").text).group(1)
        return browser.post("/login", data={"username": name, "password": password, "csrf": csrf},
                            follow_redirects=False)


def test_a_flood_of_logins_is_checked_a_few_at_a_time(tmp_path):
    small_store(tmp_path)
    add_user(tmp_path / "desk-users.json", "alice", "editor", PASSWORD)
    desk = DeskServer(tmp_path)
    try:
        assert log_in(desk.url, "alice", PASSWORD).status_code == 303  # logs in; one check made
        before = peak_rss_mib(desk.proc.pid)
        answers: list[int | str] = []  # a status code, or what the guess's client raised instead

        def guess(i: int) -> None:
            try:
                answers.append(log_in(desk.url, f"guess{i}", "wrong", timeout=WAIT_THEIR_TURN).status_code)
            except httpx.HTTPError as e:
                answers.append(repr(e))

        guesses = [threading.Thread(target=guess, args=(i,))
                   for i in range(19)]  # the most one address may try in a minute, with the login above
        for t in guesses:
            t.start()
        started = time.monotonic()
        page = httpx.get(desk.url + "/api/clusters", timeout=30)  # pages answer meanwhile
        assert page.status_code == 200 and time.monotonic() - started < 10
        deadline = time.monotonic() + HUNG_S
        for t in guesses:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in guesses), f"guesses unanswered after {HUNG_S} s: {answers}"
        assert sorted(answers, key=str) == [401] * 19, answers  # every guess checked and refused, none dropped
        grew = peak_rss_mib(desk.proc.pid) - before
        # a few checks' worth at once (was 19 of them: +546 MiB), with room for the pages' own
        assert grew < (PASSWORD_CHECKS + 3) * SCRYPT_MIB, f"peak memory grew {grew} MiB"
    finally:
        desk.stop()
