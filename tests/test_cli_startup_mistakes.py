"""Start-up mistakes in settings, listen addresses and store paths: each is one
``error:`` line naming the fix, exit 2, through the real CLI (a subprocess)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streams.broker import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKENS = {"DEEPWATCH_INGEST_TOKENS": "tip:0123456789abcdef0123"}


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
         preexec_fn=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=ROOT,
                          preexec_fn=preexec_fn)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]



def _settings_json(env: dict[str, str]) -> dict:
    r = _cli("settings", "--format", "json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- log level and format ------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["serve-ingest", "--broker", "kafka://127.0.0.1:1"],
    ["connect", "bluesky", "--dry-run", "--duration", "1"],
    ["worker", "--broker", "kafka://127.0.0.1:1"],
])
def test_an_unknown_log_level_is_one_settings_line(tmp_path, args):
    # was logging's "ValueError: Unknown level: 'LOUD'" traceback once the command had started
    extra = ["--port", str(free_port())] if args[0] == "serve-ingest" else ["--data-dir", str(tmp_path)]
    line = _one_error_line(_cli(*args, *extra, env={**TOKENS, "DEEPWATCH_LOG_LEVEL": "LOUD"}))
    assert "log_level" in line and "'WARNING'" in line and "LOUD" in line, line


def test_a_settings_mistake_is_said_without_loading_the_model_runtime(tmp_path):
    # The one line waited 1.3 s of imports (torch, through the model modules) that only sorted
    # the error into "the user's mistake" or "a bug": every mistake's answer, a typo's included.
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "streams.cli", "worker", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**base, "PYTHONPATH": str(ROOT), "DEEPWATCH_LOG_LEVEL": "LOUD"})
    assert r.returncode == 2, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "streams.settings" in imported  # the check ran in this process
    assert not {"torch", "onnxruntime", "detectors.models"} & imported, sorted(imported & {"torch", "onnxruntime"})
    [line] = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert "log_level" in line, line


@pytest.mark.parametrize("args, said", [
    (["--recipe", "pixel-probe", "--data", "{missing}"], "no manifest.csv at {missing}"),
    (["--real", "{missing}", "--fake", "{folder}"], "--real {missing}: no such folder"),
    (["--real", "{folder}", "--fake", "{missing}"], "--fake {missing}: no such folder"),
    (["--manifest", "{missing}"], "--manifest {missing}: no such file"),
    (["--real", "{folder}", "--fake", "{folder}", "--manifest", "{folder}"], "--manifest {folder}: no manifest.csv"),
])
def test_a_missing_training_set_is_said_without_loading_the_model_runtime(tmp_path, args, said):
    # `train` imported torch (about 1.3 s) before it looked at its paths: a typo's answer waited for it
    folder, missing = tmp_path / "pictures", tmp_path / "no-such-set"
    folder.mkdir()
    (folder / "real.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    paths = {"missing": missing, "folder": folder}
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "streams.cli", "train",
                        *(a.format(**paths) for a in args), "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT)})
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "streams.cli.models" in imported  # the command's own module answered
    assert not {"torch", "onnxruntime", "detectors.models"} & imported, sorted(
        imported & {"torch", "onnxruntime", "detectors.models"})
    rest = "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))
    line = _one_error_line(subprocess.CompletedProcess(r.args, r.returncode, r.stdout, rest))
    assert said.format(**paths) in line, line


def test_an_unknown_log_format_is_refused_not_taken_as_console():
    line = _one_error_line(_cli("settings", "--format", "json", env={"DEEPWATCH_LOG_FORMAT": "xml"}))
    assert "log_format" in line and "'json' or 'console'" in line, line


def test_log_level_and_format_names_are_taken_in_any_case():
    # logging took these before the names were checked; they must keep working
    doc = _settings_json({"DEEPWATCH_LOG_LEVEL": "debug", "DEEPWATCH_LOG_FORMAT": "Console"})
    assert (doc["log_level"], doc["log_format"]) == ("DEBUG", "console")
    assert _settings_json({"DEEPWATCH_LOG_LEVEL": "warn"})["log_level"] == "WARNING"


# -- detectors and devices ----------------------------------------------------------
@pytest.mark.parametrize("args", [["settings", "--format", "json"], ["detect", str(ROOT / "README.md")]])
def test_an_unknown_cheap_detector_is_one_settings_line_naming_the_known_ones(args):
    # was a KeyError traceback from `detect`, and every replay worker crashing at start
    line = _one_error_line(_cli(*args, env={"DEEPWATCH_DETECT__CHEAP": '["c2pa", "nosuch"]'}))
    assert "detect.cheap" in line and "'nosuch'" in line and "known: c2pa, generator-metadata" in line, line
    assert _settings_json({"DEEPWATCH_DETECT__CHEAP": '["c2pa", "xmp"]'})["detect"]["cheap"] == ["c2pa", "xmp"]


def test_an_unknown_device_is_refused_not_run_on_the_cpu():
    line = _one_error_line(_cli("settings", "--format", "json", env={"DEEPWATCH_DETECT__DEVICE": "tpu"}))
    assert "detect.device" in line and "auto, cpu, cuda, cuda:N, mps" in line, line
    assert _settings_json({"DEEPWATCH_DETECT__DEVICE": "cuda:1"})["detect"]["device"] == "cuda:1"


# -- inf and nan ---------------------------------------------------------------------
def test_an_infinite_timeout_is_one_settings_line_not_an_overflow():
    # was an OverflowError traceback from serve-ingest
    env = {**TOKENS, "DEEPWATCH_CONNECTORS__INGEST_BROKER_TIMEOUT_S": "inf"}
    line = _one_error_line(_cli("serve-ingest", "--port", str(free_port()), "--broker", "kafka://127.0.0.1:1", env=env))
    assert "connectors.ingest_broker_timeout_s" in line and "finite" in line, line


@pytest.mark.parametrize("name, value", [("DEEPWATCH_ALERTS__MIN_FAKE_SCORE", "nan"),
                                         ("DEEPWATCH_FETCH__READ_TIMEOUT_S", "Infinity"),
                                         ("DEEPWATCH_BATCH__CLUSTER_WITHIN_S", "-inf")])
def test_inf_and_nan_are_refused_for_every_number_setting(name, value):
    line = _one_error_line(_cli("settings", "--format", "json", env={name: value}))
    assert "invalid setting" in line and "finite" in line, line


def test_inf_in_the_settings_file_is_refused(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text("[fetch]\nread_timeout_s = inf\n")  # TOML has inf and nan literals
    line = _one_error_line(_cli("settings", "--format", "json", "--config", str(cfg)))
    assert "fetch.read_timeout_s" in line and "finite" in line, line


# -- settings files that are not files -----------------------------------------------
def _address_space_1gib() -> None:
    # the old code read /dev/zero until memory ran out: bound the test machine's share
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_a_device_as_the_settings_file_is_refused_unread():
    r = _cli("settings", "--format", "json", env={"DEEPWATCH_CONFIG": "/dev/zero"}, preexec_fn=_address_space_1gib)
    line = _one_error_line(r)
    assert "'/dev/zero' is not a regular file" in line, line


def test_a_fifo_as_the_settings_file_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    line = _one_error_line(_cli("clusters", "--data-dir", str(tmp_path), "--config", str(fifo), timeout=30))
    assert "is not a regular file" in line and "cfg.fifo" in line, line  # opening it waited for a writer


def test_a_settings_file_over_one_mib_is_refused(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_bytes(b"# padding\n" * ((1 << 20) // 10 + 1))  # valid TOML, only too large
    line = _one_error_line(_cli("settings", "--format", "json", "--config", str(cfg)))
    assert "larger than 1 MiB" in line, line


# -- secret variable names -----------------------------------------------------------
def test_a_token_list_variable_named_like_the_default_is_not_an_unknown_setting():
    # DEEPWATCH_INGEST_TOKENS is the default name; DEEPWATCH_TIPLINE_TOKENS was "unknown setting"
    doc = _settings_json({"DEEPWATCH_CONNECTORS__INGEST_TOKENS_ENV": "DEEPWATCH_TIPLINE_TOKENS",
                          "DEEPWATCH_TIPLINE_TOKENS": "tip:0123456789abcdef0123"})
    assert doc["connectors"]["ingest_tokens_env"] == "DEEPWATCH_TIPLINE_TOKENS"


# -- listen addresses ----------------------------------------------------------------
def test_the_desk_refuses_its_own_port_as_the_metrics_port(tmp_path):
    # the metrics server took the port, then uvicorn failed to bind it: exit 3 after "metrics on port"
    port = str(free_port())
    line = _one_error_line(_cli("serve", "--data-dir", str(tmp_path), "--port", port, "--metrics-port", port))
    assert line == f"error: --metrics-port {port} is --port too; give metrics a port of their own"
    r = _cli("serve", "--data-dir", str(tmp_path), "--port", port, env={"DEEPWATCH_METRICS_PORT": port})
    assert "is --port too" in _one_error_line(r)


@pytest.mark.parametrize("args", [["serve-ingest", "--broker", "kafka://127.0.0.1:1"], ["serve"], ["broker"]])
@pytest.mark.parametrize("host, says", [
    ("999.1.1.1", "--host 999.1.1.1 is neither an IP address nor a host name that resolves"),  # [Errno -2]
    ("192.0.2.1", "--host 192.0.2.1 is not an address of this machine"),  # [Errno 99], TEST-NET-1
])
def test_a_listen_address_that_cannot_be_used_names_host_and_the_fix(tmp_path, args, host, says):
    line = _one_error_line(_cli(*args, "--host", host, "--port", str(free_port()),
                                *(["--data-dir", str(tmp_path)] if args[0] in ("serve", "broker") else []), env=TOKENS))
    assert says in line and "0.0.0.0" in line and "Errno" not in line, line


def test_port_zero_checks_the_address_alone():
    from streams.net_errors import AddressNotUsable, ensure_port_free

    ensure_port_free("127.0.0.1", 0, "pick another --port")
    with pytest.raises(AddressNotUsable, match="^--listen 192.0.2.1 is not an address of this machine"):
        ensure_port_free("192.0.2.1", 0, "pick another --port", host_option="--listen")


# -- a store path typed wrong ----------------------------------------------------------
@pytest.mark.parametrize("command", [["clusters"], ["search", "x"], ["dead-letters"], ["alerts"]])
def test_a_mistyped_sqlite_store_path_is_refused_and_nothing_is_created(tmp_path, command):
    # was an empty findings.sqlite (and its directories) created, "no clusters", exit 0
    path = tmp_path / "typo" / "sub" / "findings.sqlite"
    line = _one_error_line(_cli(*command, "--store", f"sqlite://{path}", "--format", "json"))
    assert f"no findings at {path}" in line and "--store" in line, line
    assert not (tmp_path / "typo").exists()


def test_a_mistyped_sqlite_store_path_in_the_settings_is_refused_naming_the_setting(tmp_path):
    path = tmp_path / "typo" / "findings.sqlite"
    r = _cli("clusters", "--data-dir", str(tmp_path), env={"DEEPWATCH_FINDINGS__URL": f"sqlite://{path}"})
    line = _one_error_line(r)
    assert f"no findings at {path}" in line and "DEEPWATCH_FINDINGS__URL" in line, line
    assert not (tmp_path / "typo").exists()


def test_an_existing_sqlite_store_path_is_still_read(tmp_path):
    from streams.store import SqliteFindingsStore

    path = tmp_path / "elsewhere.sqlite"
    SqliteFindingsStore(path).close()
    r = _cli("clusters", "--store", f"sqlite://{path}", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr


# -- webhooks ------------------------------------------------------------------------
def _hook_config(tmp_path: Path, url: str = "https://hooks.example.org/deepwatch") -> Path:
    cfg = tmp_path / "hooks.toml"
    cfg.write_text(f'[[alerts.webhooks]]\nurl = "{url}"\nsecret_env = "SUBSCRIBER_HOOK_SECRET"\n')
    return cfg


@pytest.mark.parametrize("command", [
    ["replay", "FEED"], ["demo"], ["serve", "--port", "0"],
    ["worker", "--broker", "kafka://127.0.0.1:1", "--role", "cluster"],
])
def test_a_webhook_without_its_secret_is_refused_before_anything_starts(tmp_path, command):
    # Each delivery used to be recorded "failed: ... not set; refusing to send
    # unsigned" after a run that otherwise looked fine.
    feed = tmp_path / "feed.jsonl"
    feed.write_text("")
    args = [str(feed) if a == "FEED" else a for a in command]
    r = _cli(*args, "--data-dir", str(tmp_path / "d"), "-c", str(_hook_config(tmp_path)))
    line = _one_error_line(r)
    assert "alerts.webhooks[0]" in line and "SUBSCRIBER_HOOK_SECRET is not set" in line, line
    assert "hooks.example.org" in line and "/deepwatch" not in line, line  # the target, never its path (tokens)
    assert not (tmp_path / "d" / "findings.sqlite").exists()


def test_an_analyze_worker_needs_no_webhook_secret(tmp_path):
    # Only the roles whose sinks send alerts need the key: the analyze role
    # goes on to its next check (here the unreachable broker).
    r = _cli("worker", "--broker", "kafka://127.0.0.1:1", "--role", "analyze", "--data-dir", str(tmp_path / "d"),
             "-c", str(_hook_config(tmp_path)), timeout=120)
    line = _one_error_line(r)
    assert "cannot reach the Kafka broker" in line and "SUBSCRIBER_HOOK_SECRET" not in line, line


@pytest.mark.parametrize("url,says", [
    ("not a url", "http:// or https://"), ("ftp://hooks.example.org/x", "http:// or https://"),
    ("https://hooks.example.org:99999/x", "not a URL"), ("https:///x", "http:// or https://"),
])
def test_a_webhook_url_that_cannot_be_posted_to_is_one_settings_line(tmp_path, url, says):
    r = _cli("settings", "--format", "json", "-c", str(_hook_config(tmp_path, url)))
    line = _one_error_line(r)
    assert "alerts.webhooks" in line and says in line, line


def test_the_settings_reference_lists_each_webhook_field():
    r = _cli("settings")
    assert r.returncode == 0, r.stderr
    for name in ("url", "secret_env", "timeout_s", "retries", "retry_after_max_s", "summary"):
        assert f"`alerts.webhooks[].{name}`" in r.stdout, name


# -- findings store URL, banks file, empty variables (CLI audit) ---------------------
@pytest.mark.parametrize("args, env, says", [
    (["clusters"], {"DEEPWATCH_FINDINGS__URL": "es://host:abc"}, "port is not a number; give es://HOST:9200"),
    (["clusters", "--store", "es://host:99999"], {}, "port is out of range"),
    (["search", "--store", "https://[::1"], {}, "Invalid IPv6 URL"),
    (["serve", "--port", "0", "--store", "https://[::1"], {}, "Invalid IPv6 URL"),
    (["settings", "-f", "json"], {"DEEPWATCH_FINDINGS__URL": "es://host:abc"}, "port is not a number"),
])
def test_a_malformed_findings_store_url_is_one_line_naming_it(tmp_path, args, env, says):
    # was a ValueError traceback from every command opening the store
    line = _one_error_line(_cli(*args, "--data-dir", str(tmp_path), env=env)
                           if args[0] != "settings" else _cli(*args, env=env))
    assert says in line and ("--store" in line or "findings.url" in line), line


@pytest.mark.parametrize("kind", ["garbage", "directory"])
@pytest.mark.parametrize("args", [["bank", "list"], ["worker", "--broker", "kafka://127.0.0.1:1"], ["replay", "FEED"]])
def test_an_unreadable_banks_file_is_one_line_before_anything_starts(tmp_path, kind, args):
    # bank list: a sqlite3.DatabaseError traceback; replay: exit 0 with every event dead-lettered
    data = tmp_path / "d"
    data.mkdir()
    if kind == "directory":
        (data / "banks.sqlite").mkdir()
    else:
        (data / "banks.sqlite").write_bytes(os.urandom(5000))
    feed = tmp_path / "feed.jsonl"
    feed.write_text('{"event_id": "e"}\n')
    line = _one_error_line(_cli(*[str(feed) if a == "FEED" else a for a in args], "--data-dir", str(data)))
    assert str(data / "banks.sqlite") in line and "move it aside or restore it" in line, line


@pytest.mark.parametrize("args", [["replay", "FEED"], ["worker", "--broker", "kafka://127.0.0.1:1"]])
def test_an_unreadable_engine_state_is_one_line_before_anything_starts(tmp_path, args):
    # every worker died at start on a sqlite3 "file is not a database" traceback
    data = tmp_path / "d"
    data.mkdir()
    (data / "engine-state.sqlite").write_bytes(os.urandom(4096))
    feed = tmp_path / "feed.jsonl"
    feed.write_text('{"event_id": "e"}\n')
    line = _one_error_line(_cli(*[str(feed) if a == "FEED" else a for a in args], "--data-dir", str(data)))
    assert str(data / "engine-state.sqlite") in line and "not a readable SQLite database" in line, line


@pytest.mark.parametrize("args", [[], ["bank"], ["connect"]])
def test_a_command_group_alone_shows_its_help_and_no_empty_error(args):
    r = _cli(*args)
    assert r.returncode == 0 and r.stderr == "" and "Usage" in r.stdout, (r.returncode, r.stderr)


@pytest.mark.parametrize("args", [["worker", "--broker", "kafka://127.0.0.1:1"], ["bank", "list"], ["broker", "--port", "0"]])
def test_a_data_dir_that_cannot_be_created_names_the_option(args):
    line = _one_error_line(_cli(*args, "--data-dir", "/proc/x"))
    assert line == ("error: --data-dir /proc/x: cannot create it (No such file or directory); "
                    "pick a writable directory"), line


def test_a_users_file_that_is_a_directory_names_the_setting(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[desk]\nusers_file = "{tmp_path}"\n')
    r = _cli("desk-user", "carol", "--data-dir", str(tmp_path), "-c", str(cfg), "--password-env", "PW",
             env={"PW": "a-long-enough-password"})
    line = _one_error_line(r)
    assert f"desk.users_file {tmp_path} is a directory" in line and "Errno" not in line, line


def test_desk_user_without_a_terminal_says_so_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streams.cli", "desk-user", "carol", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, start_new_session=True,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("DEEPWATCH_")},
                            "PYTHONPATH": str(ROOT)})
    line = _one_error_line(r)  # GetPassWarning lines came first
    assert "--password-env" in line and "Warning" not in r.stderr, r.stderr


@pytest.mark.parametrize("env, says", [
    ({"DEEPWATCH_FOO": "1"}, "DEEPWATCH_FOO"),
    ({"DEEPWATCH_PARTITIONS": "99999999999"}, "'partitions'"),
    ({"DEEPWATCH_TOPIC_PREFIX": "a b"}, "'topic_prefix'"),
    ({"DEEPWATCH_DATA_DIR": ""}, "DEEPWATCH_DATA_DIR is set but empty"),
    ({"DEEPWATCH_BROKER": " "}, "DEEPWATCH_BROKER is set but empty"),
])
def test_the_settings_reference_checks_the_environment_too(env, says):
    # markdown (the default format) exited 0 with any of these
    line = _one_error_line(_cli("settings", env=env))
    assert says in line, line


def test_an_empty_variable_unsets_a_setting_that_may_be_unset():
    doc = _settings_json({"DEEPWATCH_METRICS_PORT": "", "DEEPWATCH_FINDINGS__URL": ""})
    assert doc["metrics_port"] is None and doc["findings"]["url"] is None


def test_worker_metrics_port_out_of_range_names_the_option():
    line = _one_error_line(_cli("worker", "--broker", "kafka://127.0.0.1:1", "--metrics-port", "99999"))
    assert "'--metrics-port'" in line and "65535" in line, line


@pytest.mark.parametrize("args, says", [
    (["mastodon", "--instance", "https://m.example", "--streaming-url", "garbage"], "--streaming-url 'garbage' must be"),
    (["bluesky", "--jetstream-url", "wss://[::1"], "--jetstream-url 'wss://[::1' is not a valid URL"),
])
def test_connector_urls_are_checked_before_connecting(tmp_path, args, says):
    # mastodon retried forever (UnsupportedProtocol); bluesky said a bare "Invalid IPv6 URL"
    line = _one_error_line(_cli("connect", *args, "--dry-run", "--duration", "2", "--data-dir", str(tmp_path)))
    assert says in line, line


def test_a_users_file_that_cannot_be_written_is_named_not_its_temp_file(tmp_path):
    # was "[Errno 20] Not a directory: '.../desk-users.tmp'": a temp file the user never named
    (tmp_path / "plain").write_text("")
    users = tmp_path / "plain" / "desk-users.json"
    line = _one_error_line(_cli("desk-user", "ana", "--data-dir", str(tmp_path), "--password-env", "DW_TEST_PW",
                                env={"DW_TEST_PW": "long enough password", "DEEPWATCH_DESK__USERS_FILE": str(users)}))
    assert f"cannot write the users file {users}" in line and "desk.users_file" in line and ".tmp" not in line, line


@pytest.mark.parametrize("args", [[], ["bank", "add"], ["models", "list"], ["prune"]])
def test_dash_h_is_help_everywhere(args):
    # was "No such option: -h" on every command
    short, long = _cli(*args, "-h"), _cli(*args, "--help")
    assert short.returncode == long.returncode == 0, short.stderr
    assert short.stdout == long.stdout and "Usage: " in short.stdout


@pytest.mark.parametrize("command", [["worker", "--broker", "kafka://127.0.0.1:1"], ["replay", str(ROOT / "README.md")],
                                     ["serve", "--port", "0"]])  # the desk: its first verdict was a 500
def test_a_data_dir_the_workers_cannot_write_is_refused_at_start(command):
    # a worker on a read-only data dir started, then logged "findings store write failed" for good;
    # /proc/self is a directory no one may write in, root included
    line = _one_error_line(_cli(*command, "--data-dir", "/proc/self"))
    assert "--data-dir /proc/self: cannot write in it" in line and "pick a writable directory" in line, line


def test_a_path_in_an_error_line_is_printed_as_given(tmp_path):
    # ":x:" in a path was printed as an emoji (Rich's emoji codes in the error console)
    odd = tmp_path / "report:x:2024"
    odd.write_text("")
    line = _one_error_line(_cli("alerts", "--data-dir", str(odd)))
    assert "report:x:2024" in line, line


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))


def test_every_help_fits_80_columns_without_cutting_a_name():
    # Typer's rich tables ended option and variable names with "…" at 80 columns
    # (--exclude-generat…, DEEPWATCH_ES_API…): the help never showed the whole flag
    import typer.main
    from typer.testing import CliRunner

    from streams.cli import app

    paths = [(), *_commands(typer.main.get_command(app))]
    assert len(paths) > 20
    runner = CliRunner()
    for path in paths:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert r.exit_code == 0 and "Usage: " in r.stdout, (path, r.output)
        assert "…" not in r.stdout, (path, r.stdout)
        assert max(map(len, r.stdout.splitlines())) <= 80, path


# -- hints name what was meant: environment-only variables, tables, webhook fields ----
@pytest.mark.parametrize("name, meant, not_meant", [
    ("DEEPWATCH_ES_USER", "DEEPWATCH_ES_USERNAME", "USERS_FILE"),  # was: did you mean DEEPWATCH_DESK__USERS_FILE?
    ("DEEPWATCH_ES_PASSWD", "DEEPWATCH_ES_PASSWORD", "SASL_PASSWORD_ENV"),
    ("DEEPWATCH_ES_APIKEY", "DEEPWATCH_ES_API_KEY", "see `deepwatch settings`"),
    ("DEEPWATCH_ES_CA_CERT", "DEEPWATCH_FINDINGS__CA_CERTS", "GRAFANA"),  # near a variable now a setting
    ("DEEPWATCH_WEBHOOK_SECRT", "DEEPWATCH_WEBHOOK_SECRET", "__"),
    ("DEEPWATCH_CONFG", "DEEPWATCH_CONFIG", "__"),
    ("DEEPWATCH_PARTITION", "DEEPWATCH_PARTITIONS", "_ENV"),  # settings are still found as before
    ("DEEPWATCH_FETCH__IMAGE_ROOTS", "DEEPWATCH_INGEST__IMAGE_ROOTS", "_ES_"),
])
def test_an_unknown_variable_names_the_environment_only_variable_meant(name, meant, not_meant):
    line = _one_error_line(_cli("settings", env={name: "bob"}))
    assert f"unknown setting in the environment: {name}; did you mean {meant}?" in line, line
    assert not_meant not in line.split("did you mean", 1)[1], line
    assert "bob" not in line  # the value may be the secret itself


@pytest.mark.parametrize("toml, says", [
    # a table is compared with the tables (was: did you mean 'alerts.console'?)
    ('[alert]\nconsole = true\n', "unknown table [alert] in '{cfg}'; did you mean [alerts]?"),
    ('[fech]\nretries = 1\n', "unknown table [fech] in '{cfg}'; did you mean [fetch]?"),
    ('[webhooks]\nurl = "https://hooks.example/x"\n', "did you mean [[alerts.webhooks]]?"),
    # a value with the values, as before
    ('brokr = "kafka://k:9092"\n', "unknown setting 'brokr' in '{cfg}'; did you mean 'broker'?"),
])
def test_an_unknown_table_in_the_settings_file_names_the_table_meant(tmp_path, toml, says):
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text(toml)
    line = _one_error_line(_cli("settings", "--config", str(cfg)))
    assert says.format(cfg=cfg) in line, line


@pytest.mark.parametrize("where", ["toml", "env"])
def test_an_unknown_webhook_field_names_the_hooks_own_fields(tmp_path, where):
    # was: did you mean 'alerts.webhooks' (env DEEPWATCH_ALERTS__WEBHOOKS)?, the list the key was already in
    args, env = ["settings"], {"DEEPWATCH_WEBHOOK_SECRET": "k" * 32}
    if where == "toml":
        cfg = tmp_path / "deepwatch.toml"
        cfg.write_text('[[alerts.webhooks]]\nurl = "https://hooks.example/x"\nsecret = "s3cr3t-value"\n')
        args += ["--config", str(cfg)]
    else:
        env["DEEPWATCH_ALERTS__WEBHOOKS"] = '[{"url": "https://hooks.example/x", "secret": "s3cr3t-value"}]'
    line = _one_error_line(_cli(*args, env=env))
    assert "unknown setting 'secret' in alerts.webhooks[0]" in line and "did you mean 'secret_env'" in line, line
    assert "secrets are never settings" in line and "url, name, previous_keys, secret_env" in line, line
    assert "did you mean 'alerts.webhooks'" not in line and "s3cr3t" not in line, line


def test_an_unknown_webhook_field_with_no_near_one_lists_the_fields(tmp_path):
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text('[[alerts.webhooks]]\nurl = "https://hooks.example/x"\nhmac = "x"\n')
    line = _one_error_line(_cli("settings", "--config", str(cfg), env={"DEEPWATCH_WEBHOOK_SECRET": "k" * 32}))
    assert "unknown setting 'hmac' in alerts.webhooks[0]" in line and "did you mean" not in line, line
    assert "Each alerts.webhooks entry takes: url, name" in line, line


# -- the reference lists the environment-only variables, and every setting's meaning --
def _env_table(doc: str) -> dict[str, str]:
    """variable -> the rest of its row, from the reference's second table."""
    import re

    part = doc.split("## Secrets and other environment variables", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| (.+) \|$", part, flags=re.M))


def test_the_settings_reference_lists_every_variable_the_code_reads_by_name():
    """`deepwatch settings` (docs/settings.md) listed the settings only: not
    DEEPWATCH_ES_API_KEY, the webhook secret, the token lists, DEEPWATCH_CONFIG;
    an unknown-variable error pointed there for a name it did not show."""
    import re

    from streams.settings import Settings, WebhookSettings
    from streams.settings_check import setting_paths

    r = _cli("settings")
    assert r.returncode == 0, r.stderr
    listed = _env_table(r.stdout)
    assert all(listed.values())
    settings = {"DEEPWATCH_" + p.upper().replace(".", "__") for p, _ in setting_paths()}
    settings |= {f"DEEPWATCH_{name.upper()}" for name in Settings.model_fields}
    read = set()
    pattern = re.compile(r"""(?:environ|env)(?:\.get)?[\[(]\s*"([A-Z][A-Z0-9_]+)"|envvar="([A-Z][A-Z0-9_]+)"|"""
                         r"""(?:key_env|_ENV)\b[^=\n]*=\s*"([A-Z][A-Z0-9_]+)\"""")
    for package in ("streams", "detectors", "dashboards"):
        for path in (ROOT / package).rglob("*.py"):
            for m in pattern.finditer(path.read_text()):
                read.add(next(g for g in m.groups() if g))
    read.discard("PATH_INFO")  # the WSGI request's, not the process environment
    # the secrets' default names, and what Grafana expands in the provisioning files
    defaults = Settings()
    read |= {defaults.kafka.sasl_password_env, defaults.connectors.ingest_tokens_env, defaults.desk.tokens_env,
             WebhookSettings.model_fields["secret_env"].default}
    for path in (ROOT / "dashboards" / "generated").rglob("*.yaml"):
        read |= set(re.findall(r"\$\{?(DEEPWATCH_[A-Z0-9_]+)", path.read_text()))
    assert {"DEEPWATCH_ES_API_KEY", "DEEPWATCH_WEBHOOK_SECRET", "DEEPWATCH_CONFIG", "OMP_NUM_THREADS"} <= read
    missing = sorted(read - settings - set(listed))
    assert not missing, f"read by the code, but not in `deepwatch settings`: {missing}"
    for name in ("DEEPWATCH_CONFIG", "DEEPWATCH_ES_API_KEY", "DEEPWATCH_ES_USERNAME", "DEEPWATCH_ES_PASSWORD",
                 "DEEPWATCH_WEBHOOK_SECRET", "DEEPWATCH_KAFKA_PASSWORD", "DEEPWATCH_INGEST_TOKENS",
                 "DEEPWATCH_DESK_TOKENS"):
        assert name in listed, name
    # settings now, not variables read beside them
    assert not {"DEEPWATCH_ES_CA_CERTS", "DEEPWATCH_ES_VERIFY_CERTS", "DEEPWATCH_HIVE_URL"} & set(listed)
    assert "secret_env" in listed["DEEPWATCH_WEBHOOK_SECRET"]  # each hook's own variable too
    # every DEEPWATCH_* name listed is one the loader accepts
    ok = _cli("settings", "--format", "json", env={n: "x" for n in listed if n.startswith("DEEPWATCH_")
                                                   and n not in ("DEEPWATCH_CONFIG", "DEEPWATCH_INGEST_TOKENS",
                                                                 "DEEPWATCH_DESK_TOKENS", "DEEPWATCH_ES_URL")})
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("name, value, says", [
    ("DEEPWATCH_ES_CA_CERTS", "/etc/deepwatch/es-ca/ca.crt",
     "it is the setting findings.ca_certs now; set DEEPWATCH_FINDINGS__CA_CERTS=PATH, or ca_certs"),
    ("DEEPWATCH_ES_VERIFY_CERTS", "0", "it is the setting findings.verify_certs now; "
                                       "set DEEPWATCH_FINDINGS__VERIFY_CERTS=false"),
    ("DEEPWATCH_HIVE_URL", "https://hive-proxy.internal", "it is the setting detect.vendor_urls now; "
                                                           "set DEEPWATCH_DETECT__VENDOR_URLS='{\"vendor:hive\": \"URL\"}'"),
    ("DEEPWATCH_SENSITY_URL", "https://sensity.internal", '"vendor:sensity" = "URL" under [detect.vendor_urls]'),
    ("DEEPWATCH_REALITY_DEFENDER_URL", "https://rd.internal", '{"vendor:reality-defender": "URL"}'),
])
def test_a_variable_that_became_a_setting_is_refused_naming_the_setting(tmp_path, name, value, says):
    # read outside the settings until they moved there: ignored now, a private CA or a vendor
    # proxy would silently fall back to the defaults and fail far from the cause
    line = _one_error_line(_cli("clusters", "--data-dir", str(tmp_path), env={name: value}))
    assert line.startswith(f"error: {name} is no longer read: ") and says in line, line
    assert line.endswith(f"and unset {name}") and value not in line, line


def test_the_settings_reference_lists_the_variables_no_longer_read():
    from streams.settings_check import reference_markdown

    part = reference_markdown().split("## Variables no longer read", 1)[1]
    assert "| `DEEPWATCH_ES_CA_CERTS` | `findings.ca_certs` |" in part
    assert "| `DEEPWATCH_HIVE_URL` | `detect.vendor_urls` |" in part


def test_every_setting_in_the_reference_says_what_it_does():
    # many rows had an empty "meaning": the trailing comments of streams/settings.py were missing
    from streams.settings_check import reference_markdown

    rows = [line for line in reference_markdown().split("## Secrets", 1)[0].splitlines()
            if line.startswith("| `")]
    assert len(rows) > 100
    empty = [line.split(" | ")[0] for line in rows if line.rstrip().endswith("|  |")]
    assert not empty, f"settings without a meaning (a trailing `# ...` comment in streams/settings.py): {empty}"


def test_a_worker_pointed_at_a_port_that_is_no_broker_says_so_in_one_line(tmp_path):
    """The worker's log is set up before its topic check (so the check's warnings are log lines),
    and the Kafka client's own complaints (a line per connection try) stay out of that one line."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def hang_up() -> None:  # accepts and closes: a port with something on it that is not Kafka
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        port = listener.getsockname()[1]
        r = _cli("worker", "--role", "analyze", "--broker", f"kafka://127.0.0.1:{port}", "--data-dir", str(tmp_path),
                 timeout=120)
    finally:
        listener.close()
    assert f"127.0.0.1:{port} accepts connections but did not answer as a Kafka broker" in _one_error_line(r)
