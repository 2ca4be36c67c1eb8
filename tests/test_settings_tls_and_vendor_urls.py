"""Elasticsearch's CA bundle and certificate check (``findings.ca_certs``,
``findings.verify_certs``) and the vendors' endpoints (``detect.vendor_urls``)
are settings: set in the TOML file or as ``DEEPWATCH_SECTION__FIELD``, checked
when the settings load. They were read from DEEPWATCH_ES_CA_CERTS,
DEEPWATCH_ES_VERIFY_CERTS and DEEPWATCH_<VENDOR>_URL beside the settings;
those names are refused now, naming the setting (the real CLI:
tests/test_cli_startup_mistakes.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streams.settings import load_settings
from streams.settings_check import RENAMED_ENV, SettingsError


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No DEEPWATCH_* variable of the machine running the tests."""
    for key in [k for k in os.environ if k.upper().startswith("DEEPWATCH_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def _toml(tmp_path: Path, text: str, environ: pytest.MonkeyPatch) -> None:
    path = tmp_path / "deepwatch.toml"
    path.write_text(text)
    environ.setenv("DEEPWATCH_CONFIG", str(path))  # as --config does, undone after the test


def test_the_defaults_verify_against_the_system_cas_and_call_the_vendors_public_apis(environ):
    s = load_settings()
    assert (s.findings.ca_certs, s.findings.verify_certs, s.detect.vendor_urls) == (None, True, {})


def test_toml_keys_set_them(tmp_path, environ):
    _toml(tmp_path, '[findings]\nurl = "ess://es.internal:9200"\nca_certs = "/etc/es-ca/ca.crt"\n'
                    'verify_certs = false\n\n[detect.vendor_urls]\n"vendor:hive" = "https://hive-proxy.internal/v/"\n',
          environ)
    s = load_settings()
    assert (s.findings.ca_certs, s.findings.verify_certs) == (Path("/etc/es-ca/ca.crt"), False)
    assert s.detect.vendor_urls == {"vendor:hive": "https://hive-proxy.internal/v"}  # paths are appended to it


def test_their_environment_form_sets_them_and_overrides_the_file(tmp_path, environ):
    _toml(tmp_path, '[findings]\nurl = "ess://es.internal:9200"\nca_certs = "/from/the/file.pem"\n', environ)
    environ.setenv("DEEPWATCH_FINDINGS__CA_CERTS", "/etc/es-ca/ca.crt")
    environ.setenv("DEEPWATCH_FINDINGS__VERIFY_CERTS", "false")
    environ.setenv("DEEPWATCH_DETECT__VENDOR_URLS", json.dumps({"vendor:sensity": "http://10.0.0.5:8080",
                                                                "vendor:reality-defender": "https://rd.internal"}))
    s = load_settings()
    assert s.findings.url == "ess://es.internal:9200"  # the file's other [findings] keys stay
    assert (s.findings.ca_certs, s.findings.verify_certs) == (Path("/etc/es-ca/ca.crt"), False)
    assert s.detect.vendor_urls == {"vendor:sensity": "http://10.0.0.5:8080",
                                    "vendor:reality-defender": "https://rd.internal"}


def test_an_empty_ca_certs_variable_unsets_it(tmp_path, environ):
    _toml(tmp_path, '[findings]\nca_certs = "/from/the/file.pem"\n', environ)
    environ.setenv("DEEPWATCH_FINDINGS__CA_CERTS", "")
    assert load_settings().findings.ca_certs is None


@pytest.mark.parametrize("name, value, says", [
    ("DEEPWATCH_FINDINGS__VERIFY_CERTS", "maybe", "invalid setting 'findings.verify_certs': Input should be a "
                                                  "valid boolean"),
    ("DEEPWATCH_DETECT__VENDOR_URLS", '{"vendor:hiv": "https://hive-proxy.internal"}',
     "invalid setting 'detect.vendor_urls': Value error, unknown vendor 'vendor:hiv'; known: vendor:hive, "
     "vendor:reality-defender, vendor:sensity"),
    ("DEEPWATCH_DETECT__VENDOR_URLS", '{"vendor:hive": "ftp://hive-proxy.internal"}',
     "vendor:hive: must be an http:// or https:// URL with a host"),
    ("DEEPWATCH_DETECT__VENDOR_URLS", '{"vendor:hive": "https://hive-proxy.internal:99999"}', "vendor:hive: not a URL"),
    ("DEEPWATCH_DETECT__VENDOR_URLS", '{"vendor:hive": "https://hive-proxy.internal/?region=eu"}',
     "vendor:hive: must not have a query (?) or fragment (#): request paths are appended to it"),
    ("DEEPWATCH_DETECT__VENDOR_URLS", '{"vendor:hive": 5}', "invalid setting 'detect.vendor_urls.vendor:hive': "
                                                           "Input should be a valid string"),
    ("DEEPWATCH_DETECT__VENDOR_URLS", "https://hive-proxy.internal", "DEEPWATCH_DETECT__VENDOR_URLS must be JSON"),
])
def test_an_invalid_value_is_one_line_naming_the_setting(environ, name, value, says):
    environ.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_vendor_url_with_a_password_is_refused_without_showing_it(environ):
    environ.setenv("DEEPWATCH_DETECT__VENDOR_URLS", '{"vendor:hive": "https://me:hunter2@hive-proxy.internal"}')
    with pytest.raises(SettingsError, match="must not hold a user or password: the API key is read from "
                                            "HIVE_API_KEY") as e:
        load_settings()
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("old", sorted(RENAMED_ENV))
def test_a_variable_read_before_the_move_is_refused_naming_its_setting(environ, old):
    environ.setenv(old, "https://elsewhere.internal")
    setting, _ = RENAMED_ENV[old]
    with pytest.raises(SettingsError) as e:
        load_settings()
    line = str(e.value)
    assert line.startswith(f"{old} is no longer read: it is the setting {setting} now; set "), line
    assert "DEEPWATCH_" + setting.upper().replace(".", "__") in line and "elsewhere" not in line, line


def test_a_misspelt_old_name_is_pointed_at_the_setting_not_at_a_lookalike(environ):
    # with DEEPWATCH_ES_CA_CERTS gone from the variables read, the closest was Grafana's DEEPWATCH_GRAFANA_ES_CA_CERT
    environ.setenv("DEEPWATCH_ES_CA_CERT", "/etc/ca.pem")
    with pytest.raises(SettingsError, match=r"did you mean DEEPWATCH_FINDINGS__CA_CERTS\?$"):
        load_settings()
