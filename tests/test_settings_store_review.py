"""Settings and findings-store mistakes an operator or analyst makes: each is
one ``error:`` line naming the fix (real CLI, real SQLite files)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from streams.store import SCHEMA_VERSION, SqliteFindingsStore, StoreError
from tests.test_store import _alert, _sighting, _snap

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DEEPWATCH_")}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd or ROOT)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# -- settings -------------------------------------------------------------------
@pytest.mark.parametrize("name, value, example", [
    ("DEEPWATCH_INGEST__IMAGE_ROOTS", "/srv/images", '["a", "b"]'),  # a list setting given as a plain path
    ("DEEPWATCH_DETECT__MODELS", "a,b", '["a", "b"]'),
    ("DEEPWATCH_ALERTS__WEBHOOKS", "https://hooks.example/x", '[{"key": "value"}]'),
    ("DEEPWATCH_FETCH", "{max_bytes: 5}", '{"key": "value"}'),  # a whole section, not JSON
])
def test_a_list_or_table_setting_in_the_environment_that_is_not_json_is_one_line(name, value, example):
    # was a pydantic_settings.SettingsError traceback naming only the section
    line = _one_error_line(_cli("settings", "--format", "json", env={name: value}))
    assert name in line and example in line, line


@pytest.mark.parametrize("name, value, where", [
    ("DEEPWATCH_ALERTS__WEBHOOKS", '[{"url":"https://hooks.example/T0KEN?key=K3Y"', "at the end of the value, after "
                                                                                   "its 45 characters"),  # unclosed
    ("DEEPWATCH_ALERTS__WEBHOOKS", "[{'url': 'https://hooks.example/T0KEN?key=K3Y'}]", "at character 3 of 48"),
    ("DEEPWATCH_ALERTS", '{"webhooks": [{"url": "https://hooks.example/T0KEN?key=K3Y"}],}', "at character 63 of 63"),
    ("DEEPWATCH_DETECT__VENDOR_URLS", '{"vendor:hive": https://svc:K3Y@hive.internal/T0KEN}', "at character 17 of 52"),
    ("DEEPWATCH_ALERTS__WEBHOOKS", '[\n {"url": "https://hooks.example/T0KEN?key=K3Y"}\n,]', "at line 3 column 2"),
])
def test_a_value_that_is_not_json_is_never_quoted_where_it_may_hold_a_secret(name, value, where):
    # The error quoted the first 80 characters of the value: a webhook URL's
    # token and key (README: settings errors never quote webhook URLs). It says
    # where the JSON went wrong instead.
    line = _one_error_line(_cli("settings", "--format", "json", env={name: value}))
    assert f"{name} must be JSON" in line and where in line, line
    assert "T0KEN" not in line and "K3Y" not in line and "hooks.example" not in line and "got" not in line, line


def test_a_value_that_is_not_json_and_holds_no_url_is_still_quoted():
    line = _one_error_line(_cli("settings", "--format", "json", env={"DEEPWATCH_INGEST__IMAGE_ROOTS": "/srv/images"}))
    assert line.endswith("; Expecting value at character 1 of 11 (got '/srv/images')"), line


def test_settings_json_does_not_print_credentials_in_urls(tmp_path):
    # (credentials in findings.url are refused when settings load: tests/test_findings_consolidation.py)
    cfg = tmp_path / "d.toml"
    cfg.write_text('[findings]\nurl = "https://es.internal:9200"\n')
    r = _cli("settings", "--format", "json", "--config", str(cfg),
             env={"DEEPWATCH_BROKER": "kafka://svc:s3cret@k1:9092,svc:s3cret@k2:9092"})
    assert r.returncode == 0, r.stderr
    assert "s3cret" not in r.stdout
    doc = json.loads(r.stdout)
    assert doc["findings"]["url"] == "https://es.internal:9200"
    assert doc["broker"] == "kafka://***@k1:9092,***@k2:9092"


def test_a_rejected_value_is_echoed_without_its_credentials(tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text('[alerts]\nwebhooks = "https://user:hunter2@hooks.example/x"\n')
    line = _one_error_line(_cli("settings", "--format", "json", "--config", str(cfg)))
    assert "alerts.webhooks" in line and "hunter2" not in line


# -- store files that cannot be used ---------------------------------------------
@pytest.mark.parametrize("content, expected", [
    (b"this is a text file, not a database\n" * 200, "is not a readable SQLite database"),
    (None, "cannot open findings store"),  # a directory where the file should be
])
def test_a_findings_file_that_is_not_a_database_is_one_line(tmp_path, content, expected):
    path = tmp_path / "findings.sqlite"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    line = _one_error_line(_cli("clusters", "--data-dir", str(tmp_path)))
    assert expected in line and "findings.sqlite" in line, line
    if content is not None:
        assert path.read_bytes() == content  # nothing was written over it


def test_another_programs_database_is_refused_and_left_alone(tmp_path):
    other = tmp_path / "banks.sqlite"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE banks (name TEXT)")
    db.commit()
    db.close()
    os.chmod(other, 0o644)
    line = _one_error_line(_cli("clusters", "--store", f"sqlite://{other}"))
    assert "not a deepwatch findings store" in line, line
    tables = {n for n, in sqlite3.connect(other).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"banks"}  # no findings tables quietly added to it
    assert other.stat().st_mode & 0o777 == 0o644  # nor made owner-only as if it were one


def test_a_store_from_a_newer_deepwatch_is_refused(tmp_path):
    path = tmp_path / "findings.sqlite"
    SqliteFindingsStore(path).close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer deepwatch"):
        SqliteFindingsStore(path)
    line = _one_error_line(_cli("clusters", "--data-dir", str(tmp_path)))
    assert "newer deepwatch" in line


# -- rows that do not read back -----------------------------------------------------
def _store_with_two_clusters(path: Path) -> SqliteFindingsStore:
    store = SqliteFindingsStore(path)
    store.apply_snapshots([_snap("good", 1, sighting=_sighting("e1", "a" * 64, 1), score=0.9),
                           _snap("bad", 1, sighting=_sighting("e2", "b" * 64, 2), score=0.1)])
    store.add_alert(_alert("good"))
    return store


def test_one_damaged_cluster_row_does_not_break_looking_up_another(tmp_path):
    store = _store_with_two_clusters(tmp_path / "findings.sqlite")
    store._db.execute("UPDATE clusters SET evidence='{not json' WHERE cluster_id='bad'")
    # cluster() read (and validated) every cluster of the store to return one
    assert store.cluster("good").id == "good"
    # the live table's top-N built every cluster to keep the first N
    assert [c.id for c in store.clusters(limit=1)] == ["good"]
    with pytest.raises(StoreError, match="cluster 'bad' does not read back"):
        store.clusters()
    store.close()


def test_damaged_rows_are_one_error_line_naming_the_row(tmp_path):
    store = _store_with_two_clusters(tmp_path / "findings.sqlite")
    store._db.execute("UPDATE clusters SET velocity='{\"sightings_5m\": \"many\"}' WHERE cluster_id='bad'")
    store._db.execute("UPDATE alerts SET doc='{}' WHERE alert_id='good:1'")
    store.close()
    line = _one_error_line(_cli("clusters", "--data-dir", str(tmp_path), "--format", "json"))
    assert "cluster 'bad'" in line and "velocity" in line, line
    line = _one_error_line(_cli("alerts", "--data-dir", str(tmp_path), "--format", "json"))
    assert "alert 'good:1'" in line, line


def test_workers_get_every_section_of_the_parents_settings(tmp_path, monkeypatch):
    # Only some sections were handed to the worker processes: a TOML file's
    # [desk] (desk.public_url, the link in every alert webhook) and [batch]
    # stopped at `deepwatch demo/replay -c FILE`.
    import os

    from streams.runner import settings_env
    from streams.settings import load_settings

    toml = tmp_path / "dw.toml"
    toml.write_text('[desk]\npublic_url = "https://desk.example.org"\n[batch]\ncluster_max_ops = 7\n'
                    '[connectors]\nbackoff_max_s = 9.0\n')
    monkeypatch.setenv("DEEPWATCH_CONFIG", str(toml))
    parent = load_settings(data_dir=tmp_path)
    env = settings_env(parent, "tansu://127.0.0.1:1")
    for key in [k for k in os.environ if k.startswith("DEEPWATCH_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("DEEPWATCH_"):
            monkeypatch.setenv(key, value)
    worker = load_settings()
    for name, value in parent:
        if hasattr(value, "model_dump"):  # a section
            assert getattr(worker, name).model_dump() == value.model_dump(), name
    assert worker.desk.public_url == "https://desk.example.org" and worker.batch.cluster_max_ops == 7


def test_a_misspelt_override_is_an_error_not_a_default():
    from streams.settings import load_settings

    with pytest.raises(TypeError, match="'data_dirr'"):
        load_settings(data_dirr="/x")
    assert load_settings(partitions=3).partitions == 3


def test_an_index_prefix_elasticsearch_refuses_is_refused_when_settings_load():
    # "News Room" loaded, and only the dashboards generator (or the first write) said no
    from pydantic import ValidationError

    from streams.settings import Settings

    for bad in ("News Room", "-x", "a/b", "UPPER"):
        with pytest.raises(ValidationError, match="cannot start an Elasticsearch index name"):
            Settings(findings={"index_prefix": bad})
    assert Settings(findings={"index_prefix": "newsroom-2"}).findings.index_prefix == "newsroom-2"
