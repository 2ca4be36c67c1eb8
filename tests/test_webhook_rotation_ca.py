"""Webhook key rotation (``previous_secret_env``) and a hook's own CA bundle
(``ca_certs``), against real receivers on 127.0.0.1: plain HTTP, and HTTPS
with a certificate a test CA made here signed."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import re
import ssl
import textwrap
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from streams import webhooks
from streams.settings import Settings, WebhookSettings
from streams.webhooks import (
    PREVIOUS_SIGNATURE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookError, unset_previous_keys, verify,
)
from tests import test_webhooks
from tests.test_webhooks import ENV, SECRET, _alert, _deliver, _lo, _sink_alert, _sinks

receiver = test_webhooks.receiver  # records each request; "valid": today's check (one header, the current key)

OLD_ENV = "DEEPWATCH_TEST_WEBHOOK_OLD_SECRET"
OLD_SECRET = "the-key-being-retired"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv(ENV, SECRET)
    monkeypatch.setenv(OLD_ENV, OLD_SECRET)


def _http_hook(srv, **kw) -> WebhookSettings:
    return WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5, **kw)


def _snippet(text: str) -> str:
    """The receiver example in ``text``: the indented block after "A receiver
    (Python)::" (the module docstring), or the fenced python block that reads
    both signature headers (README.md)."""
    fenced = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if PREVIOUS_SIGNATURE_HEADER in b]
    if fenced:
        return textwrap.dedent(fenced[0])
    return textwrap.dedent(re.search(r"A receiver \(Python\)::\n\n((?:    .*\n|\n)+)", text).group(1))


def _documented_verifiers():
    out = {}
    for name, text in (("streams/webhooks.py", webhooks.__doc__),
                       ("README.md", (ROOT / "README.md").read_text(encoding="utf-8"))):
        scope: dict = {}
        exec(compile(_snippet(text), name, "exec"), scope)
        out[name] = scope["verify"]
    return out


# -- key rotation ----------------------------------------------------------------------
def test_during_a_rotation_either_key_verifies_and_todays_check_still_passes(receiver):
    srv = receiver(200)
    assert _deliver(_lo(_http_hook(srv, previous_secret_env=OLD_ENV)), _alert()) == "delivered"
    [req] = srv.requests
    h, body = req["headers"], req["body"]
    assert req["valid"], "a receiver checking X-Deepwatch-Signature alone with the current key, unchanged"
    assert h[SIGNATURE_HEADER].startswith("sha256=") and "," not in h[SIGNATURE_HEADER]
    assert verify(OLD_SECRET.encode(), h[TIMESTAMP_HEADER], body, h[PREVIOUS_SIGNATURE_HEADER])
    assert not verify(OLD_SECRET.encode(), h[TIMESTAMP_HEADER], body, h[SIGNATURE_HEADER])
    for where, check in _documented_verifiers().items():
        assert check(OLD_SECRET.encode(), h, body), f"{where}: a receiver still on the retiring key"
        assert check(SECRET.encode(), h, body), f"{where}: a receiver already on the new key"
        assert not check(b"someone else's key", h, body), where
        assert not check(OLD_SECRET.encode(), h, body.replace(b"0.93", b"0.10")), f"{where}: tampered body"


def test_once_previous_secret_env_is_removed_only_the_current_key_signs(receiver):
    srv = receiver(200)
    assert _deliver(_lo(_http_hook(srv)), _alert()) == "delivered"
    [req] = srv.requests
    assert req["valid"] and PREVIOUS_SIGNATURE_HEADER not in req["headers"]
    check = _documented_verifiers()["README.md"]
    assert check(SECRET.encode(), req["headers"], req["body"])
    assert not check(OLD_SECRET.encode(), req["headers"], req["body"])


def test_a_retiring_key_that_is_not_set_signs_nothing_and_is_warned_of(receiver, monkeypatch, tmp_path):
    monkeypatch.setenv(OLD_ENV, "")
    srv = receiver(200)
    hook = _http_hook(srv, previous_secret_env=OLD_ENV)
    assert _deliver(_lo(hook), _alert()) == "delivered"
    [req] = srv.requests
    assert req["valid"] and PREVIOUS_SIGNATURE_HEADER not in req["headers"]

    settings = Settings(data_dir=tmp_path)
    settings.alerts.webhooks = [_http_hook(srv), hook]
    [line] = unset_previous_keys(settings)
    assert line.startswith("alerts.webhooks[1] (http://127.0.0.1:") and OLD_ENV in line and ENV in line
    monkeypatch.setenv(OLD_ENV, OLD_SECRET)
    assert unset_previous_keys(settings) == []


def test_neither_key_shows_in_errors_logs_or_the_settings(receiver, caplog):
    srv = receiver(500)
    hook = _http_hook(srv, previous_secret_env=OLD_ENV)
    with caplog.at_level(logging.DEBUG), pytest.raises(WebhookError) as e:
        _deliver(_lo(hook), _alert())
    shown = " ".join([str(e.value), caplog.text, repr(hook), hook.model_dump_json()])
    assert SECRET not in shown and OLD_SECRET not in shown


def test_previous_secret_env_naming_secret_env_is_refused():
    with pytest.raises(ValidationError, match="same variable as secret_env"):
        WebhookSettings(url="https://hooks.example.org/h", secret_env=ENV, previous_secret_env=ENV)
    assert WebhookSettings(url="https://hooks.example.org/h", previous_secret_env="").previous_secret_env is None


# -- a hook's own CA bundle ---------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _server_cert(ca_key, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA, a server certificate for 127.0.0.1 it signed, and a
    second CA that signed nothing; each as a file."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("deepwatch test CA")
    srv_key, srv_cert = _server_cert(ca_key, ca_cert)
    _, other_cert = _ca("some other CA")
    files = {"ca": d / "ca.pem", "other_ca": d / "other-ca.pem", "server_cert": d / "server.pem",
             "server_key": d / "server-key.pem"}
    files["ca"].write_bytes(_pem(ca_cert))
    files["other_ca"].write_bytes(_pem(other_cert))
    files["server_cert"].write_bytes(_pem(srv_cert))
    files["server_key"].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return {k: str(v) for k, v in files.items()}


class _TlsReceiver(test_webhooks._Receiver):
    """tests/test_webhooks.py's receiver behind TLS, with the private CA's certificate."""

    def __init__(self, statuses: list[int], pki: dict[str, str]):
        super().__init__(statuses)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
        # a client that refuses the certificate fails the handshake in accept(): an
        # OSError the server drops, on to the next connection
        self.socket = ctx.wrap_socket(self.socket, server_side=True)


@pytest.fixture
def tls_receiver(pki):
    yield from test_webhooks.serving(lambda statuses: _TlsReceiver(statuses, pki))


def _https_hook(srv, **kw) -> WebhookSettings:
    return WebhookSettings(url=f"https://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5, **kw)


def test_a_hook_with_ca_certs_delivers_to_a_receiver_its_ca_signed(tls_receiver, pki, tmp_path):
    """Through the alert sink, whose senders share one client: the hook's
    bundle verifies its receiver; the same receiver without it is a
    recorded delivery failure naming the certificate, not a crash."""
    srv = tls_receiver([200])
    sinks, store = _sinks(tmp_path, _https_hook(srv, ca_certs=pki["ca"], name="private-ca"),
                          _https_hook(srv, name="system-cas"))
    asyncio.run(_sink_alert(sinks, _alert()))
    by_target = {d.target: d for d in store.delivery_status()["c-1:1"]}
    assert by_target["hook:private-ca"].state == "delivered"
    refused = by_target["hook:system-cas"]
    assert refused.state == "failed" and "CERTIFICATE_VERIFY_FAILED" in refused.detail, refused.detail
    [req] = srv.requests
    assert req["valid"] and json.loads(req["body"])["alert_id"] == "c-1:1"


def test_a_bundle_of_another_ca_does_not_verify_the_receiver(tls_receiver, pki):
    srv = tls_receiver([200])
    with pytest.raises(WebhookError, match="CERTIFICATE_VERIFY_FAILED"):
        _deliver(_lo(_https_hook(srv, ca_certs=pki["other_ca"])), _alert())
    assert srv.requests == []


def test_a_bundle_gone_since_the_start_fails_the_delivery(tls_receiver, pki, tmp_path):
    srv = tls_receiver([200])
    moved = tmp_path / "ca-moved-away.pem"
    moved.write_bytes(Path(pki["ca"]).read_bytes())
    hook = _https_hook(srv, ca_certs=str(moved))
    moved.unlink()
    with pytest.raises(WebhookError, match="cannot read ca_certs"):
        _deliver(_lo(hook), _alert())


def test_ca_certs_on_an_http_url_is_one_clear_settings_error(pki, monkeypatch):
    from streams.settings import load_settings
    from streams.settings_check import SettingsError

    monkeypatch.delenv("DEEPWATCH_CONFIG", raising=False)
    monkeypatch.setenv("DEEPWATCH_ALERTS__WEBHOOKS", json.dumps(
        [{"url": "http://hooks.example.org/t0ken", "secret_env": ENV, "ca_certs": pki["ca"]}]))
    with pytest.raises(SettingsError, match=r"^invalid setting 'alerts\.webhooks\.0\.ca_certs': .*only for https://") as e:
        load_settings()
    assert "\n" not in str(e.value) and "t0ken" not in str(e.value)


@pytest.mark.parametrize("case, why", [
    ("missing", "no such file"),
    ("a directory", "is not a file"),
    ("empty", "not a PEM CA bundle"),
    ("not PEM", "not a PEM CA bundle"),
    ("a server certificate", "holds no CA certificate"),
])
def test_a_bad_ca_certs_stops_a_command_that_sends_alerts_in_one_line(pki, tmp_path, monkeypatch, capsys, case, why):
    from streams.cli.common import check_alert_senders
    from streams.settings import load_settings

    path = {"missing": tmp_path / "nope.pem", "a directory": tmp_path, "empty": tmp_path / "empty.pem",
            "not PEM": tmp_path / "junk.pem", "a server certificate": Path(pki["server_cert"])}[case]
    (tmp_path / "empty.pem").write_bytes(b"")
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    monkeypatch.delenv("DEEPWATCH_CONFIG", raising=False)
    monkeypatch.setenv("DEEPWATCH_ALERTS__WEBHOOKS", json.dumps(
        [{"url": "https://hooks.example.org/t0ken", "secret_env": ENV, "ca_certs": str(path)}]))
    settings = load_settings()  # commands that only read findings still start on a host without the bundle
    with pytest.raises(typer.Exit):
        check_alert_senders(settings)
    said = capsys.readouterr().err.strip()
    assert "\n" not in said and "t0ken" not in said and why in said, said
    assert said.startswith("error: alerts.webhooks[0] (https://hooks.example.org") and "ca_certs" in said, said


def test_a_good_ca_certs_loads(pki):
    hook = WebhookSettings(url="https://hooks.example.org/h", ca_certs=pki["ca"])
    assert hook.ca_certs == pki["ca"]
    ctx = webhooks.ca_context(pki["ca"])
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert webhooks.ca_context(pki["ca"]) is ctx, "read once per process, not per delivery"
    assert ctx.cert_store_stats()["x509_ca"] == 1, "the bundle alone, not the system's CAs too"


def test_a_retiring_key_shared_across_hosts_and_one_not_set_are_warned_before_a_command_sends(monkeypatch, capsys):
    from streams.cli.common import check_alert_senders

    monkeypatch.setenv("DEEPWATCH_TEST_B_SECRET", "b-key")
    shared_old = Settings(alerts={"webhooks": [
        {"url": "https://a.example/x", "secret_env": ENV, "previous_secret_env": OLD_ENV},
        {"url": "https://b.example/x", "secret_env": "DEEPWATCH_TEST_B_SECRET", "previous_secret_env": OLD_ENV}]})
    check_alert_senders(shared_old)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: ") and OLD_ENV in line and "a.example" in line and "b.example" in line

    monkeypatch.setenv(OLD_ENV, "")
    check_alert_senders(Settings(alerts={"webhooks": [
        {"url": "https://a.example/x", "secret_env": ENV, "previous_secret_env": OLD_ENV}]}))
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: alerts.webhooks[0] (https://a.example") and "not set" in line
