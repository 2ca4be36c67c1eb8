"""Bearer tokens from the environment: the desk's ``role:name:token`` and the
ingest server's ``name:token`` are parsed alike (``streams.tokens``)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from streams.desk.app import create_app
from streams.desk.auth import token_principal, tokens_from_env
from streams.settings import Settings
from streams.tokens import TokenConfigError, presented
from tests.desk_support import small_store

TOKEN = "e" * 24
OTHER = "v" * 24


def test_blanks_around_a_desk_token_are_dropped(monkeypatch):
    # "editor:erin: TOKEN" kept the blank as part of the token: every request with it was 401
    monkeypatch.setenv("T", f" editor:erin: {TOKEN} , viewer : vic :{OTHER}\t")
    tokens = tokens_from_env("T")
    assert tokens == {TOKEN: ("erin", "editor"), OTHER: ("vic", "viewer")}
    p = token_principal(tokens, TOKEN)
    assert (p.user, p.role, p.via) == ("erin", "editor", "token")
    assert token_principal(tokens, "x" * 24) is None


@pytest.mark.parametrize("value,match", [
    (f"editor:erin:{TOKEN} viewer:vic:{OTHER}", "contains whitespace"),  # a missing comma
    ("editor:erin:short", "shorter than 16"),
    (f"admin:erin:{TOKEN}", "role viewer|editor"),
    (f"editor::{TOKEN}", "a name"),
    (f"{TOKEN}", "role:name:token"),
])
def test_a_malformed_desk_token_list_is_refused(monkeypatch, value, match):
    monkeypatch.setenv("T", value)
    with pytest.raises(TokenConfigError, match=match):
        tokens_from_env("T")


def test_presented_finds_the_token_given():
    tokens = {TOKEN: "a", OTHER: "b"}
    assert presented(tokens, OTHER) == "b"
    assert presented(tokens, f" {TOKEN} ") == "a"
    assert presented(tokens, TOKEN[:-1]) is None


def test_the_desk_accepts_a_token_configured_with_blanks(tmp_path, monkeypatch):
    small_store(tmp_path)
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"viewer:vic: {OTHER}")
    with TestClient(create_app(Settings(data_dir=tmp_path)), base_url="http://127.0.0.1") as c:
        assert c.get("/api/clusters", headers={"Authorization": f"Bearer {OTHER}"}).status_code == 200
        assert c.get("/api/clusters", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
