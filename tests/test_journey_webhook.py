"""An alert subscriber following README.md ("Webhooks are signed"): the
receiver example there, run as written, on a real signed delivery to a
receiver on 127.0.0.1, with the request's headers as the usual Python
stacks hand them over."""

from __future__ import annotations

import email.message
import re
import textwrap
from pathlib import Path

from streams.settings import WebhookSettings
from tests import test_webhooks
from tests.test_webhook_rotation_ca import _documented_verifiers
from tests.test_webhooks import ENV, SECRET, _alert, _deliver, _lo

receiver = test_webhooks.receiver  # records each request's raw body and headers

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_verify():
    """``verify`` from README.md's fenced receiver example, executed as printed."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
              if "def verify(" in b]
    assert len(blocks) == 1, "README.md should show one receiver example"
    scope: dict = {}
    exec(compile(textwrap.dedent(blocks[0]), "README.md", "exec"), scope)
    return scope["verify"]


def _as_message(headers: dict[str, str]) -> email.message.Message:
    """The headers as ``http.server`` gives a handler them (``self.headers``)."""
    m = email.message.Message()
    for name, value in headers.items():
        m[name] = value
    return m


def test_the_readme_receiver_verifies_a_real_delivery_in_any_header_case(receiver, monkeypatch):
    # The example read "X-Deepwatch-Timestamp" from a plain dict: behind a
    # Lambda function URL, over HTTP/2 or from dict(request.headers) in
    # Starlette the names arrive lower-cased, and every genuine alert was
    # refused as unsigned.
    monkeypatch.setenv(ENV, SECRET)
    srv = receiver(200)
    hook = WebhookSettings(url=f"http://127.0.0.1:{srv.server_address[1]}/hook", secret_env=ENV, retries=0,
                           timeout_s=5)
    assert _deliver(_lo(hook), _alert()) == "delivered"
    [req] = srv.requests
    body, headers = req["body"], req["headers"]
    assert req["valid"]  # the library's own check agrees the delivery is genuine
    shapes = {
        "as sent": headers,
        "lower-cased (HTTP/2, Lambda function URLs, dict(starlette headers))": {k.lower(): v for k, v in headers.items()},
        "http.server's self.headers": _as_message(headers),
    }
    # README's example and the one in streams.webhooks' docstring alike
    for where, verify in {"README.md": _readme_verify(), **_documented_verifiers()}.items():
        for shape, given in shapes.items():
            assert verify(SECRET.encode(), given, body), (where, shape)
            assert not verify(b"another subscriber's key", given, body), (where, shape)
            assert not verify(SECRET.encode(), given, body.replace(b"0.93", b"0.10")), (where, shape, "tampered")

