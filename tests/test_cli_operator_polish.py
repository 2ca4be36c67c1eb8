"""What a new operator's first hour showed: a cluster still waiting for its
model result looked final, one evidence paragraph made each table row a
dozen lines tall on 80 columns, empty answers printed a bare table header,
`models list` alone took --json instead of --format, a hash list without a
hash column did not say which names it takes, `deepwatch --help` cut the
train summary mid-thought, uvicorn's ANSI copy of each message reached the
JSON logs, sklearn warned once per fold, and a failed Jetstream connection
did not name the host."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from detectors.base import Evidence
from streams.cli import app
from streams.findings import ClusterRecord
from tests.findings_fixture import fill, snapshots

ROOT = Path(__file__).resolve().parents[1]
# a pixel model's explanation: the paragraph that made each row 12-15 lines tall
PARAGRAPH = ("efficientnet-lite2 pixel probe pixel-probe-lite2 v5: no opinion, too small for the pixel probe: 1 px "
             "on the short side (it needs at least 96 px; smaller pictures are upscaled and real photos then often "
             "score as AI).")


def _cli(*args: str, columns: int = 80, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT,
                          env={**base, "PYTHONPATH": str(ROOT), "COLUMNS": str(columns), **(env or {})})


@pytest.fixture
def store(tmp_path) -> str:
    """The findings fixture; c-flood waits for its model result and carries a
    paragraph of evidence."""
    from streams.store import open_store

    s = open_store(tmp_path)
    fill(s)
    flood = [x for x in snapshots() if x.cluster_id == "c-flood"][-1]
    s.apply_snapshot(flood.model_copy(update={
        "revision": flood.revision + 100, "models_pending": True,
        "evidence": [Evidence(detector="model:pixel-probe-lite2", score=0.2, weight=1.0, detail=PARAGRAPH)]}))
    s.close()
    return str(tmp_path)


def _row(cid: str, **kw) -> ClusterRecord:
    """A stored cluster as the table reads it; ``kw`` overrides fields, with
    evidence and members given only by what the table shows of them."""
    row = {"id": cid, "fake_score": 0.2, "verdict": "no-evidence", "alert_level": 0, "evidence": [],
           "sightings": 3, "accounts": 2, "velocity": {"sightings_5m": 1}, "members": [{}], **kw}
    return ClusterRecord.model_validate({
        **row, "platforms": ["x"], "first_seen": "2026-11-20T10:00:00+00:00", "last_seen": "2026-11-20T10:04:00+00:00",
        "engagement": {}, "merged_from": [], "merged_into": None, "models_pending": row.get("models_pending", False),
        "suppressed": None, "stream_sightings": row["sightings"], "revision": 1, "updated_at": None,
        "evidence": [{"detector": "metadata", "score": row["fake_score"], **e} for e in row["evidence"]],
        "members": [{"sha256": f"{i:064x}", "phash": "0" * 16, "pdq": "0" * 64, "pdq_quality": 100,
                     "event_id": f"{cid}-{i}", **m} for i, m in enumerate(row["members"])]})


def _render(renderable, width: int = 80) -> str:
    console = Console(width=width, record=True)
    console.print(renderable)
    return console.export_text()


def _row_lines(text: str, cid: str) -> list[str]:
    """The lines of ``cid``'s row: its own line and the continuation lines
    under it (they start with blanks where the id column is)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(cid))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * len(cid)) and lines[end].strip() \
            and not lines[end].lstrip().startswith("*"):
        end += 1
    return lines[start:end]


# -- 1. a cluster still waiting for its model result says so --------------------------
def test_a_cluster_waiting_for_its_model_result_is_marked_and_the_caption_says_why():
    from streams.cli.query import cluster_table

    pending = _row("edfc825e5d1eef8f", models_pending=True, evidence=[{"detail": "no metadata"}])
    done = _row("0123456789abcdef", verdict="likely-ai", fake_score=0.91, evidence=[{"detail": "C2PA"}])
    text = _render(cluster_table([pending, done]))
    assert re.search(r"edfc825e5d1eef8f\s+0\.20\s+no-evidence\*", text), text
    assert "likely-ai*" not in text  # its result is in
    assert "waiting for a model result" in text and "`deepwatch worker --role detect`" in text, text
    assert max(map(len, text.splitlines())) <= 80
    # the command is never cut in two, however narrow the table
    assert "deepwatch worker --role detect" in _render(cluster_table([_row("c-1", models_pending=True)]))
    # nothing waits: no mark, no caption
    text = _render(cluster_table([done]))
    assert "*" not in text and "waiting" not in text


def test_clusters_marks_the_pending_row_and_json_keeps_the_flag(store):
    r = _cli("clusters", "--data-dir", store)
    assert r.returncode == 0, r.stderr
    assert "no-evidence*" in r.stdout and "waiting for a model result" in r.stdout, r.stdout
    assert "likely-ai*" not in r.stdout and "inconclusive*" not in r.stdout
    assert max(map(len, r.stdout.splitlines())) <= 80
    rows = {c["id"]: c for c in json.loads(_cli("clusters", "--data-dir", store, "--format", "json").stdout)}
    assert rows["c-flood"]["models_pending"] is True and rows["c-flood"]["verdict"] == "no-evidence"


# -- 2. evidence takes at most three lines of a row; JSON has it whole ------------------
def test_the_evidence_cell_is_at_most_three_lines_on_80_columns():
    from streams.cli.query import cluster_table

    rows = [_row(f"{i:016x}", evidence=[{"detail": PARAGRAPH}], sightings=123456, accounts=4321,
                 velocity={"sightings_5m": 999}, members=[{}] * 120) for i in range(6)]
    text = _render(cluster_table(rows, title="deepwatch — live clusters"))
    assert max(map(len, text.splitlines())) <= 80
    for i in range(6):
        lines = _row_lines(text, f"{i:016x}")
        assert len(lines) <= 3, "\n".join(lines)
        assert lines[-1].rstrip().endswith("…")  # says it was cut
    assert len(text.splitlines()) <= 3 + 6 * 3  # was about 80 lines for six clusters
    assert "123k" in text  # six-digit counts keep to four columns


def test_clusters_table_cuts_the_evidence_and_json_keeps_it_whole(store):
    table = _cli("clusters", "--data-dir", store).stdout
    assert len(_row_lines(table, "c-flood")) <= 3, table
    rows = {c["id"]: c for c in json.loads(_cli("clusters", "--data-dir", store, "--format", "json").stdout)}
    assert rows["c-flood"]["evidence"][0]["detail"] == PARAGRAPH


def test_detect_table_evidence_is_at_most_three_lines_on_80_columns():
    from streams.cli.detect import _render_table

    result = {"path": "photos/harbour-fire.png", "sha256": "a" * 64, "format": "PNG", "width": 1, "height": 1,
              "score": 1.0, "verdict": "likely-ai", "warnings": [], "error": None,
              "evidence": [{"detector": "generator-metadata", "detail": "ComfyUI metadata in PNG 'prompt' tEXt chunk "
                            "and PNG 'workflow' tEXt chunk; model v1-5-pruned-emaonly.ckpt"},
                           {"detector": "model:pixel-probe-lite2", "detail": PARAGRAPH}]}
    console = Console(width=80, record=True)
    _render_table([result], console)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    body = [line for line in text.splitlines() if line.strip()][3:]  # title, header, rule
    assert 1 <= len(body) <= 3, text
    assert "[generator-metadata]" in text and body[-1].rstrip().endswith("…"), text


# -- 3. one-line errors all start "error:" ----------------------------------------------
@pytest.mark.parametrize("args", [
    ["worker", "--broker", "kafka://127.0.0.1:1"],
    ["worker", "--broker", "kafka://127.0.0.1:1", "--no-create-topics"],  # the worker's own check
    ["connect", "bluesky", "--broker", "kafka://127.0.0.1:1"],
    ["connect", "mastodon", "--instance", "https://mastodon.example", "--broker", "kafka://127.0.0.1:1"],
])
def test_an_unreachable_broker_is_one_lowercase_error_line(tmp_path, args):
    r = _cli(*args, "--data-dir", str(tmp_path / "d"))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: cannot reach the Kafka broker at 127.0.0.1:1"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- 4. models list takes --format like every other listing ------------------------------
def test_models_list_takes_format_and_keeps_json_as_an_alias(tmp_path):
    d = str(tmp_path / "d")
    by_format = CliRunner().invoke(app, ["models", "list", "-d", d, "--format", "json"])
    by_alias = CliRunner().invoke(app, ["models", "list", "-d", d, "--json"])
    short = CliRunner().invoke(app, ["models", "list", "-d", d, "-f", "json"])
    assert by_format.exit_code == by_alias.exit_code == short.exit_code == 0, by_format.output
    assert json.loads(by_format.stdout) == json.loads(by_alias.stdout) == json.loads(short.stdout)
    table = CliRunner().invoke(app, ["models", "list", "-d", d, "--format", "table"])
    assert table.exit_code == 0 and not table.stdout.lstrip().startswith("["), table.output
    bad = CliRunner().invoke(app, ["models", "list", "-d", d, "--format", "xml"])
    assert bad.exit_code == 2 and "must be 'table' or 'json'" in bad.output, bad.output


# -- 5. an empty answer says so, on stderr, in table form only -----------------------------
def test_a_search_with_no_hits_says_so_under_the_table_only(store):
    r = _cli("search", "no-such-words-anywhere", "--data-dir", store)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "no clusters match this search", r.stderr
    r = _cli("search", "no-such-words-anywhere", "--data-dir", store, "--format", "json")
    assert json.loads(r.stdout) == [] and r.stderr == "", r.stderr
    r = _cli("search", "harbour", "--data-dir", store)
    assert "c-fire" in r.stdout and "no clusters match" not in r.stderr


@pytest.mark.parametrize("command, says", [(["clusters"], "no clusters yet"), (["alerts"], "no alerts"),
                                           (["dead-letters"], "no dead letters")])
def test_an_empty_store_says_there_is_nothing_yet(tmp_path, command, says):
    from streams.store import open_store

    open_store(tmp_path).close()
    r = _cli(*command, "--data-dir", str(tmp_path))
    assert r.returncode == 0 and r.stderr.strip() == says, r.stderr
    r = _cli(*command, "--data-dir", str(tmp_path), "--format", "json")
    assert json.loads(r.stdout) == [] and r.stderr == "", r.stderr


# -- 6. a hash list whose header names no hash column ----------------------------------------
def test_a_header_without_a_hash_column_lists_the_names_it_takes(tmp_path):
    from detectors.signals import signal_types

    bad = tmp_path / "bad.csv"
    bad.write_text("sha256,label\nabc,x\n")
    r = _cli("bank", "import", "te", str(bad), "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert f"{bad}: no pdq or phash column in header ['sha256', 'label']" in line, line
    assert ":2:" not in line
    for st in signal_types():
        assert all(alias in line for alias in st.csv_aliases), line
    assert "64-hex PDQ" in line and "16-hex pHash" in line


def test_a_line_without_a_valid_hash_says_what_its_column_held(tmp_path):
    bad = tmp_path / "md5.csv"
    bad.write_text("hash,label\nd41d8cd98f00b204e9800998ecf8427e,x\n")  # an MD5 under a PDQ column name
    r = _cli("bank", "import", "te", str(bad), "--data-dir", str(tmp_path / "d"))
    line = r.stderr.strip()
    assert r.returncode == 2 and f"{bad}:2: no valid 64-hex PDQ or 16-hex pHash" in line, line
    assert "column 'hash' holds 'd41d8cd98f00b204e9800998ecf8427e', 32 characters" in line, line


# -- 7. every summary in `deepwatch --help` is whole -----------------------------------------
def test_every_command_summary_in_the_top_help_is_a_whole_sentence():
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0
    commands = r.stdout.split("Commands:", 1)[1]
    summaries: dict[str, str] = {}
    name = None
    for line in commands.splitlines():
        m = re.match(r"  (\S+)\s+(.*)", line)
        if m:
            name = m.group(1)
            summaries[name] = m.group(2)
        elif line.strip() and name:
            summaries[name] += " " + line.strip()
    assert "train" in summaries and len(summaries) > 20
    for name, text in summaries.items():
        assert text.endswith(".") and not text.endswith("..."), (name, text)  # "Two recipes:", "debunked fakes..."
    assert summaries["train"].startswith("Train a detector: ") and "pixel-probe" in summaries["train"]


# -- 8. logs and warnings ----------------------------------------------------------------------
def test_uvicorns_colour_copy_of_a_message_stays_out_of_the_json_log():
    from streams import logs

    buf = io.StringIO()
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Uvicorn running on %s", ("http://x",),
                               None)
    record.color_message = "Uvicorn running on \x1b[1m%s\x1b[0m"  # what uvicorn's loggers attach
    record.port = 8087
    handler = logs.ThrottledHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    handler.emit(record)
    line = buf.getvalue()
    assert "\\u001b" not in line and "\x1b" not in line, line
    doc = json.loads(line)
    assert "color_message" not in doc and doc["msg"] == "Uvicorn running on http://x" and doc["port"] == 8087


def test_leave_generator_out_eval_turns_sklearns_convergence_warnings_into_one_line(tmp_path, monkeypatch):
    from PIL import Image
    from sklearn.exceptions import ConvergenceWarning
    import warnings

    import detectors.models.pixel_backbone as backbone
    import detectors.models.pixel_features as features
    import detectors.models.pixel_train as train

    rows = ["file,label,generator,category,source"]
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"r{i}.png")
        Image.new("RGB", (8, 8), (0, i, 0)).save(tmp_path / f"a{i}.png")
        rows += [f"r{i}.png,0,camera,landscape,cam@1", f"a{i}.png,1,gen-{i % 2},landscape,gen{i % 2}@1"]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")

    def cross_validate(*args, **kwargs):
        for fold in range(3):  # what a tiny fold's MLP fit says
            warnings.warn(f"Stochastic Optimizer: Maximum iterations (300) reached (fold {fold})", ConvergenceWarning)
        warnings.warn("something else", UserWarning)
        return SimpleNamespace(oof={"reposted": None}, fold_of=np.arange(3))  # a CvResult's fields the command reads

    monkeypatch.setattr(backbone, "Backbone", lambda name: None)
    monkeypatch.setattr(features, "extract", lambda *args, **kwargs: None)
    monkeypatch.setattr(train, "cross_validate", cross_validate)
    monkeypatch.setattr(train, "calibrate_and_threshold", lambda samples, cv: (SimpleNamespace(apply=lambda z: z), 0.5))
    monkeypatch.setattr(train, "cv_report", lambda *args: {})
    monkeypatch.setattr(train, "people_fp_rates", lambda *args: {})
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        r = CliRunner().invoke(app, ["eval", str(tmp_path), "--leave-generator-out", "--format", "json",
                                     "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mode"] == "leave-generator-out"
    notes = [line for line in r.stderr.splitlines() if "iteration limit" in line]
    assert notes == ["note: 3 of the probe's fits stopped at their iteration limit before converging "
                     "(expected on small folds)"], r.stderr
    assert "ConvergenceWarning" not in r.stderr
    assert not any(issubclass(w.category, ConvergenceWarning) for w in shown)
    # any other warning is left as it was
    assert [str(w.message) for w in shown if w.category is UserWarning] == ["something else"]


# -- 9. a failed Jetstream connection names the host ----------------------------------------------
def test_a_failed_jetstream_connection_names_the_host(tmp_path, caplog):
    from streams.connectors.run import build_bluesky, open_state
    from streams.connectors.sinks import JsonlSink
    from streams.settings import Settings

    s = Settings(data_dir=tmp_path / "data")
    s.connectors.backoff_initial_s = 0.05
    s.connectors.backoff_max_s = 0.2
    s.connectors.connect_timeout_s = 0.5
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    runner = build_bluesky(s, JsonlSink(io.StringIO(), keep=True), open_state(s, "t"),
                           url=f"ws://127.0.0.1:{port}/subscribe")
    failed = _failures_of(runner, "deepwatch.connectors.bluesky", caplog)
    assert failed[0].getMessage() == f"connection to 127.0.0.1:{port} failed: Connection refused"
    assert failed[0].host == f"127.0.0.1:{port}" and "ConnectionRefusedError" in failed[0].error


def test_a_failed_mastodon_stream_names_the_host(tmp_path, caplog):
    from streams.connectors.run import build_mastodon, open_state
    from streams.connectors.sinks import JsonlSink
    from streams.settings import Settings

    s = Settings(data_dir=tmp_path / "data")
    s.connectors.backoff_initial_s = 0.05
    s.connectors.backoff_max_s = 0.2
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    runner = build_mastodon(s, JsonlSink(io.StringIO(), keep=True), open_state(s, "m"), instance=base,
                            streaming_url=base)
    failed = _failures_of(runner, "deepwatch.connectors.mastodon", caplog)
    assert failed[0].getMessage() == f"stream from 127.0.0.1:{port} failed: Connection refused"
    assert failed[0].host == f"127.0.0.1:{port}"


def _failures_of(runner, logger: str, caplog) -> list:
    """The connection-failure records a connector logs while it runs half a second against a closed port."""
    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.WARNING, logger):
        asyncio.run(go())
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert failed, [r.getMessage() for r in caplog.records]
    return failed


def test_a_tls_failure_is_named_as_such_not_by_its_openssl_code():
    # ssl errors are OSErrors whose errno is OpenSSL's code: errno 1 read "Operation not permitted"
    import ssl

    import httpx

    from streams.net_errors import network_reason

    bad = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    bad.reason = "CERTIFICATE_VERIFY_FAILED"
    try:
        raise httpx.ConnectError("handshake") from bad
    except httpx.ConnectError as e:
        assert network_reason(e) == "TLS: CERTIFICATE_VERIFY_FAILED"
    assert network_reason(ConnectionRefusedError(111, "refused")) == "Connection refused"
