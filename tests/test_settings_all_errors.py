"""A settings refusal lists every mistake at once, each naming where its value
came from: an operator upgrading with three outdated keys fixed one a run,
and could not tell whether the settings file or a variable set to the same
key held the value refused (upgrade report, item 7). One mistake is still one
line (tests/test_cli_startup_mistakes.py compares those)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.settings import load_settings, setting_source
from streams.settings_check import MAX_LISTED_MISTAKES, SettingsError
from tests.test_settings_tls_and_vendor_urls import _toml, environ  # noqa: F401 - environ: the fixture

ROOT = Path(__file__).resolve().parents[1]

# The upgrade's file: three values an older release took
OUTDATED = """\
[alerts]
min_sightings_5m = 10000
min_fake_score = 1.5
[detect]
device = "gpu"
"""


def _config(tmp_path: Path, text: str, environ: pytest.MonkeyPatch) -> Path:
    _toml(tmp_path, text, environ)  # as --config does, undone after the test
    return tmp_path / "deepwatch.toml"


def _refusal(*args, **overrides) -> list[str]:
    with pytest.raises(SettingsError) as e:
        load_settings(*args, **overrides)
    return str(e.value).splitlines()


def test_every_refused_value_of_the_file_is_listed_with_its_key(tmp_path, environ):
    cfg = _config(tmp_path, OUTDATED, environ)
    heading, *lines = _refusal()
    assert heading == "3 settings mistakes, each with its fix:", heading
    assert len(lines) == 3 and all(line.startswith("  invalid setting '") for line in lines), lines
    text = "\n".join(lines)
    for key in ("[alerts] min_sightings_5m", "[alerts] min_fake_score", "[detect] device"):
        assert f"set in {cfg}: {key}" in text, text
    # each keeps its fix, as the one-line form says it
    assert "'gpu' is not one of auto, cpu, cuda, cuda:N, mps" in text and "must be at most 5000" in text, text


def test_one_mistake_is_still_one_line_now_naming_its_source(tmp_path, environ):
    cfg = _config(tmp_path, "[alerts]\nmin_fake_score = 1.5\n", environ)
    (line,) = _refusal()
    assert line.startswith("invalid setting 'alerts.min_fake_score': Input should be less than or equal to 1 "
                           "(got '1.5')"), line
    assert line.endswith(f"; set in {cfg}: [alerts] min_fake_score"), line


def test_a_variable_over_the_file_is_named_as_the_source(tmp_path, environ):
    # both set the key: the variable wins (the precedence), so it is the one to fix
    cfg = _config(tmp_path, OUTDATED, environ)
    environ.setenv("DEEPWATCH_ALERTS__MIN_FAKE_SCORE", "2")
    environ.setenv("DEEPWATCH_DETECT", '{"device": "tpu"}')  # a whole table in JSON
    text = "\n".join(_refusal())
    assert "(got '2'); set in the environment: DEEPWATCH_ALERTS__MIN_FAKE_SCORE" in text, text
    assert "(got 'tpu'); set in the environment: DEEPWATCH_DETECT" in text, text
    assert f"set in {cfg}: [alerts] min_sightings_5m" in text, text
    assert f"{cfg}: [alerts] min_fake_score" not in text and f"{cfg}: [detect]" not in text, text


def test_unknown_keys_of_every_source_come_in_one_refusal(tmp_path, environ):
    cfg = _config(tmp_path, 'brokr = "kafka://k:9092"\n[alert]\nconsole = true\n[alerts]\nmin_sightings = 3\n'
                            '[[alerts.webhooks]]\nurl = "https://h.example/x?token=T0KEN"\nsecret = "s3cr3t-value"\n',
                  environ)
    environ.setenv("DEEPWATCH_PARTITION", "4")
    environ.setenv("DEEPWATCH_ES_CA_CERTS", "/etc/ca.pem")
    heading, *lines = _refusal()
    assert heading == "6 settings mistakes, each with its fix:", (heading, lines)
    text = "\n".join(lines)
    for says in ("unknown setting in the environment: DEEPWATCH_PARTITION; did you mean DEEPWATCH_PARTITIONS?",
                 "DEEPWATCH_ES_CA_CERTS is no longer read: it is the setting findings.ca_certs now",
                 f"unknown setting 'brokr' in {str(cfg)!r}; did you mean 'broker'?",
                 f"unknown table [alert] in {str(cfg)!r}; did you mean [alerts]?",
                 f"unknown setting 'alerts.min_sightings' (in {cfg}: [alerts] min_sightings); did you mean "
                 "'alerts.min_sightings_5m'",
                 f"unknown setting 'secret' in alerts.webhooks[0] (in {cfg}: [[alerts.webhooks]] (entry 1) secret); "
                 "did you mean 'secret_env'"):
        assert says in text, (says, text)
    assert "T0KEN" not in text and "s3cr3t" not in text, text


def test_a_webhook_value_is_placed_by_its_entry_never_echoed(tmp_path, environ):
    cfg = _config(tmp_path, '[[alerts.webhooks]]\nurl = "https://h.example/x?token=T0KEN"\n'
                            '[[alerts.webhooks]]\nurl = "h.example/y?token=T0KEN"\n[fetch]\nretries = -1\n', environ)
    text = "\n".join(_refusal())
    assert f"set in {cfg}: [[alerts.webhooks]] (entry 2) url" in text and f"set in {cfg}: [fetch] retries" in text, text
    assert "T0KEN" not in text, text


def test_an_empty_variable_is_refused_once_by_name(tmp_path, environ):
    # its value (None) fails the setting too: that second line said the same, less clearly
    _config(tmp_path, "[fetch]\nretries = -1\n", environ)
    environ.setenv("DEEPWATCH_DATA_DIR", "")
    heading, *lines = _refusal()
    assert heading.startswith("2 settings mistakes") and len(lines) == 2, (heading, lines)
    assert "DEEPWATCH_DATA_DIR is set but empty" in lines[0] and "'fetch.retries'" in lines[1], lines


def test_a_garbage_file_is_cut_short(tmp_path, environ):
    _config(tmp_path, "".join(f"key{i} = {i}\n" for i in range(45)), environ)
    heading, *lines = _refusal()
    assert heading.startswith("45 settings mistakes"), heading
    assert len(lines) == MAX_LISTED_MISTAKES + 1 and lines[-1] == f"  and {45 - MAX_LISTED_MISTAKES} more", lines


def test_a_flag_value_is_given_no_file_or_variable_as_source(tmp_path, environ):
    # the file sets the same key, but the flag's value is the one refused
    _config(tmp_path, "partitions = 3\n", environ)
    (line,) = _refusal(partitions=0)
    assert line.startswith("invalid setting 'partitions'") and "set in" not in line, line


def test_the_top_level_source_is_still_asked_the_same(tmp_path, environ):
    _config(tmp_path, 'broker = "kafka://k:9092"\n', environ)
    environ.setenv("DEEPWATCH_DATA_DIR", str(tmp_path))
    assert (setting_source("broker"), setting_source("data_dir"), setting_source("app_id")) == ("toml", "env", None)


def test_the_cli_lists_them_without_a_traceback(tmp_path):
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text(OUTDATED)
    env = {**{k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "streams.cli", "settings", "--config", str(cfg)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == "error: 3 settings mistakes, each with its fix:" and len(lines) == 4, r.stderr
    assert all(f"set in {cfg}: [" in line for line in lines[1:]), r.stderr


def test_a_mistake_of_a_whole_list_of_tables_names_the_list(tmp_path, environ):
    # the upgrade's old file: two unnamed hooks on one host (a rule over the list, not one entry)
    cfg = _config(tmp_path, '[[alerts.webhooks]]\nurl = "http://127.0.0.1:9/hook?token=T0KEN"\n'
                            '[[alerts.webhooks]]\nurl = "http://127.0.0.1:9/other"\n', environ)
    (line,) = _refusal()
    assert "give each a distinct `name`" in line and line.endswith(f"; set in {cfg}: [[alerts.webhooks]]"), line
    assert "T0KEN" not in line, line
