"""What a new user, an operator and an analyst meet when they follow the README
and docs literally: documented JSON fields exist, and a mistyped name, root,
broker or data dir is one ``error:`` line naming the fix, before anything
starts (or anything is asked for)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streams.cli import app  # registers every command group
from streams.cli.query import clusters as clusters_command
from streams.broker import free_port
from streams.store import open_store
from tests import findings_fixture
from tests.test_cli_startup_mistakes import _one_error_line
from tests.support import picture

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    # stdin closed: a command that would prompt (desk-user) must not wait on the terminal
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT)


def test_every_field_the_clusters_help_names_is_in_its_json(tmp_path):
    # the help promised a `merges` field that `clusters --format json` never had
    store = open_store(tmp_path)
    findings_fixture.fill(store)
    store.close()
    r = runner.invoke(app, ["clusters", "--data-dir", str(tmp_path), "--format", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert rows
    doc = " ".join(clusters_command.__doc__.split())
    form = doc.split("JSON form: an array of objects with", 1)[1].rstrip(".")
    nested = dict(re.findall(r"(\w+) \(([^)]*)\)", form))
    top = [t.strip() for t in re.split(r",|\band\b|\bplus\b", re.sub(r"\([^)]*\)", "", form)) if t.strip()]
    assert "members" in top and "evidence" in top
    for row in rows:
        missing = [name for name in top if name not in row]
        assert not missing, f"the help names {missing}, the JSON has {sorted(row)}"
        for field, inner in nested.items():
            for item in row[field]:
                assert all(k.strip() in item for k in inner.split(",")), (field, inner, item)


def test_desk_user_checks_the_name_before_asking_for_a_password(tmp_path):
    # was: the password prompt first (twice, in a terminal), then the name refused
    line = _one_error_line(_cli("desk-user", "erin smith", "--role", "editor", "--data-dir", str(tmp_path)))
    assert "NAME" in line and "letters, digits" in line and "password" not in line, line
    assert not (tmp_path / "desk-users.json").exists()


def test_serve_refuses_a_broker_that_is_not_a_kafka_url_at_start(tmp_path):
    # was: the desk started, and every desk alert later logged "not published on the alerts topic"
    line = _one_error_line(_cli("serve", "--data-dir", str(tmp_path), "--port", str(free_port()),
                                "--broker", "localhost"))
    assert "--broker" in line and "HOST:PORT" in line, line


def test_replay_refuses_an_image_root_that_is_not_a_directory(tmp_path):
    # was: accepted, so every path under the mistyped root became a dead letter (worker already refused it)
    feed = tmp_path / "feed.jsonl"
    feed.write_text("{}\n")
    line = _one_error_line(_cli("replay", str(feed), "--data-dir", str(tmp_path / "data"),
                                "--image-root", str(tmp_path / "no-such-dir"), timeout=120))
    assert "--image-root" in line and "no-such-dir" in line and "not a directory" in line, line
    assert not (tmp_path / "data").exists()


def test_similar_says_when_the_data_dir_has_no_findings_and_no_banks(tmp_path):
    # was: `[]` ("nothing is near") for a mistyped --data-dir, where `clusters` says there are no findings
    image = tmp_path / "q.jpg"
    picture(1, (320, 240)).save(image, quality=90)
    r = runner.invoke(app, ["similar", str(image), "--data-dir", str(tmp_path / "typo")])
    assert r.exit_code == 2, r.output
    assert "no findings and no banks" in r.output and "typo" in r.output, r.output


@pytest.mark.parametrize("which", ["findings", "banks"])
def test_similar_still_answers_with_only_findings_or_only_banks(tmp_path, which):
    image = tmp_path / "q.jpg"
    picture(1, (320, 240)).save(image, quality=90)
    data = tmp_path / "data"
    if which == "findings":
        store = open_store(data)
        findings_fixture.fill(store)
        store.close()
    else:
        other = tmp_path / "other.jpg"
        picture(7, (320, 240)).save(other, quality=90)
        assert runner.invoke(app, ["bank", "add", "b", str(other), "--verdict", "fake",
                                   "--data-dir", str(data)]).exit_code == 0
    r = runner.invoke(app, ["similar", str(image), "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == []


@pytest.mark.parametrize("command", [["schema"], ["settings"]])
def test_an_out_file_that_cannot_be_written_names_the_fix(tmp_path, command):
    # was: "error: [Errno 2] No such file or directory: '...'"
    r = runner.invoke(app, [*command, "--out", str(tmp_path / "no-such-dir" / "out.md")])
    assert r.exit_code == 2 and "directory" in r.output and "does not exist; create it first" in r.output, r.output
    r = runner.invoke(app, [*command, "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory: name a file in it" in r.output, r.output
    r = runner.invoke(app, [*command, "--out", str(tmp_path / "out.md")])
    assert r.exit_code == 0 and (tmp_path / "out.md").stat().st_size > 0, r.output


def test_the_command_list_gives_each_summary_without_the_docstrings_line_breaks():
    # was: every multi-line first paragraph broke mid-sentence in `deepwatch --help`
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert r.exit_code == 0, r.output
    assert "with the cheap detectors (C2PA, XMP, generator metadata" in r.output, r.output
    assert "replay a bundled demo feed (a viral AI fake" in r.output, r.output
    r = CliRunner().invoke(app, ["detect", "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert "the exit status is 1 only if every file failed" in r.output, r.output  # its own page: the whole text


def test_every_option_of_every_command_is_explained_in_its_help():
    # train's --epochs/--batch-size/--lr/--seed and eval's --device/--batch had no text at all
    import typer.main

    bare: list[str] = []

    def walk(command, path: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        if not hasattr(command, "commands"):
            bare.extend(f"{' '.join(path)} {p.opts[0]}" for p in command.params
                        if p.name != "help" and not getattr(p, "help", None))

    walk(typer.main.get_command(app), ["deepwatch"])
    assert not bare, bare


def test_a_relative_path_not_found_says_which_root_it_was_taken_from(tmp_path):
    # `deepwatch ingest` of a feed whose paths are relative to the feed, into a worker
    # whose --image-root is elsewhere, dead-lettered every event as "'images/a.png' does not exist"
    import asyncio

    from streams.fetch import ImageFetcher
    from streams.safe_http import FetchError
    from streams.records import ImageEvent
    from streams.settings import FetchSettings, IngestSettings

    root = tmp_path / "images"
    root.mkdir()
    event = ImageEvent.model_validate({"event_id": "e1", "platform": "x", "account_id": "a",
                                       "posted_at": "2026-11-20T10:00:00+00:00", "image": {"path": "images/a.png"}})

    async def get() -> bytes:
        fetcher = ImageFetcher(FetchSettings(), IngestSettings(image_roots=[root]))
        try:
            return await fetcher.get(event, None)
        finally:
            await fetcher.aclose()

    with pytest.raises(FetchError) as info:
        asyncio.run(get())
    assert info.value.reason == "not_found"
    assert "'images/a.png' does not exist under " + str(root.resolve()) in info.value.detail, info.value.detail
    assert "first image root" in info.value.detail


def test_an_ingest_token_entry_without_its_token_says_the_token_is_missing():
    # DEEPWATCH_INGEST_TOKENS="tipline" was "the token for 'token-1' is shorter than 16 characters"
    from streams.ingest_server import TokenConfigError, load_tokens

    with pytest.raises(TokenConfigError) as info:
        load_tokens("DEEPWATCH_INGEST_TOKENS", {"DEEPWATCH_INGEST_TOKENS": "tipline"})
    assert "entry 1 is not NAME:TOKEN" in str(info.value) and "token-1" not in str(info.value), info.value
    bare = "0123456789abcdef0123"
    assert load_tokens("T", {"T": bare}) == {bare: "token-1"}  # a bare token of full length is still fine
    assert load_tokens("T", {"T": f"tip:{bare}"}) == {bare: "tip"}
