"""What the desk says when a request is wrong, after a new-user audit: the
API's OpenAPI document declared FastAPI's default 422 body (``{"detail":
[{"loc", "msg", "type"}]}``, ``type`` required) and no 401/403/404/409/413/503,
while the desk answers ``{"error", "status", "detail": [{"loc", "msg"}]}``;
pages showed pydantic's words ("Value error, ...", a raw regex, one message
twice); error pages dropped "read-only (loopback)" from the header; and the
login lockout's page led to the queue, away from the login form. The real app
over a real SQLite findings store, through FastAPI's TestClient."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from streams.desk import create_app
from streams.desk.auth import add_user
from streams.settings import Settings
from tests.desk_support import small_store

EDITOR_TOKEN = "editor-token-0123456789abcdef"
EDITOR = {"Authorization": f"Bearer {EDITOR_TOKEN}"}
PASSWORD = "correct horse battery"
PYDANTIC_WORDS = ("Value error", "Assertion failed", "String should match pattern", "Input should be",
                  "unable to parse", "^[0-9a-f]")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("desk-error-wording")
    small_store(data)
    add_user(data / "desk-users.json", "alice", "editor", PASSWORD)
    return data


@pytest.fixture
def c(data, monkeypatch):
    monkeypatch.setenv("DEEPWATCH_DESK_TOKENS", f"editor:ed:{EDITOR_TOKEN}")
    s = Settings(data_dir=data)
    s.desk.account_check_s = 3600  # the background check runs once at start
    with TestClient(create_app(s), base_url="http://127.0.0.1") as client:
        yield client


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def response_schema(schema: dict[str, Any], path: str, method: str, code: int) -> dict[str, Any]:
    responses = schema["paths"][path][method]["responses"]
    assert str(code) in responses, f"{method.upper()} {path} declares no {code}: {sorted(responses)}"
    return resolve(schema, responses[str(code)]["content"]["application/json"]["schema"])


def assert_fits(schema: dict[str, Any], declared: dict[str, Any], body: dict[str, Any]) -> None:
    """``body`` has every key ``declared`` requires and none it does not declare, its items too."""
    assert set(declared.get("required", [])) <= body.keys() <= declared["properties"].keys(), (declared, body)
    for item in body.get("detail") or []:
        item_schema = resolve(schema, declared["properties"]["detail"]["items"])
        assert set(item_schema.get("required", [])) <= item.keys() <= item_schema["properties"].keys(), item


def test_the_openapi_422_is_the_body_the_desk_sends(c):
    schema = c.get("/openapi.json").json()
    body = c.get("/api/clusters", params={"limit": "abc"}).json()
    declared = response_schema(schema, "/api/clusters", "get", 422)
    assert_fits(schema, declared, body)
    assert set(declared["required"]) == {"error", "status"}
    assert set(resolve(schema, declared["properties"]["detail"]["items"])["properties"]) == {"loc", "msg"}  # no "type"
    # every route with parameters or a body declares the desk's 422, never FastAPI's
    assert "HTTPValidationError" not in str(schema)
    body = c.post("/api/clusters/c-viral/verdict", json={"verdict": "probably"}, headers=EDITOR).json()
    assert_fits(schema, response_schema(schema, "/api/clusters/{cluster_id}/verdict", "post", 422), body)


def test_the_openapi_declares_the_errors_the_desk_answers(c, monkeypatch):
    schema = c.get("/openapi.json").json()
    declared = {(path, method): set(op["responses"]) for path, ops in schema["paths"].items()
                for method, op in ops.items()}
    assert {"400", "401", "403", "404", "409", "413", "422", "503"} <= \
        declared[("/api/clusters/{cluster_id}/verdict", "post")]
    for path in ("/api/clusters", "/api/accounts", "/api/search", "/api/clusters/{cluster_id}"):
        assert {"401", "403", "422", "503"} <= declared[(path, "get")], path
    assert "404" in declared[("/api/clusters/{cluster_id}", "get")]
    assert "413" in declared[("/api/similar", "post")]
    # and each declared shape is what those answers carry
    answers = [
        ("/api/clusters/{cluster_id}", "get", 404, c.get("/api/clusters/nope")),
        ("/api/clusters/{cluster_id}/verdict", "post", 401,
         c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake"})),
        ("/api/clusters/{cluster_id}/verdict", "post", 400,
         c.post("/api/clusters/c-viral/verdict", content=b'{"verdict": "fake\xff"}',
                headers={"Content-Type": "application/json", **EDITOR})),
        ("/api/search", "get", 422, c.get("/api/search")),  # no condition: the desk's own 422, no detail
        ("/thumb/{sha256}", "get", 400, c.get("/thumb/not-a-sha")),
    ]
    for path, method, code, r in answers:
        assert r.status_code == code, (path, r.text)
        assert_fits(schema, response_schema(schema, path, method, code), r.json())
    # a merged-away cluster's 409 and a body over 64 KiB's 413, as declared
    r = c.post("/api/clusters/c-viral/verdict", json={"verdict": "fake", "note": "x" * 100_000}, headers=EDITOR)
    assert r.status_code == 413
    assert_fits(schema, response_schema(schema, "/api/clusters/{cluster_id}/verdict", "post", 413), r.json())


@pytest.mark.parametrize("path,field,want", [
    ("/?verdict=bogus", "verdict", "verdict: must be one of likely-ai, inconclusive"),
    ("/?cursor=garbage", "cursor", "cursor: not a cursor this desk gave"),
    ("/clusters/c-viral?members_after=zzz", "members_after",
     "members_after: 'zzz' is not a sha256 (64 characters, 0-9 and a-f)"),
    ("/search?limit=abc", "limit", "limit: 'abc' is not a whole number"),
    ("/?limit=0", "limit", "limit: must be at least 1 ('0' was sent)"),
    ("/search?q=x&sort=bogus", "sort", "sort: 'bogus' is not one of 'velocity'"),
])
def test_a_page_says_whats_wrong_in_one_sentence(c, path, field, want):
    r = c.get(path)
    assert r.status_code == 422
    said = unescape(re.search(r'<p class="error" id="(?:page-error|error-message)">(.*?)</p>', r.text).group(1))
    assert said.startswith("bad request: " + want), said
    assert said.count(f"{field}:") == 1, said  # named once: one problem, told once
    assert not any(w in said for w in PYDANTIC_WORDS), said


@pytest.mark.parametrize("path,field", [
    ("/api/clusters?limit=abc", "limit"), ("/api/search?limit=abc", "limit"), ("/api/clusters?verdict=bogus", "verdict"),
    ("/api/clusters?cursor=garbage", "cursor"), ("/api/clusters/c-viral?members_after=zzz", "members_after"),
])
def test_an_api_422_says_it_once_in_words(c, path, field):
    body = c.get(path).json()
    assert body["status"] == 422 and body["error"].count(f"{field}:") == 1, body
    assert [d["loc"] for d in body["detail"]] == [["query", field]], body
    for said in (body["error"], body["detail"][0]["msg"]):
        assert not any(w in said for w in PYDANTIC_WORDS), said


@pytest.mark.parametrize("path,status", [("/clusters/nope", 404), ("/nowhere", 404), ("/accounts/nobody", 404),
                                         ("/clusters/c-viral?members_after=zzz", 422)])
def test_an_error_page_keeps_the_headers_reading_mode(c, path, status):
    r = c.get(path)
    assert r.status_code == status
    who = re.search(r'<div class="who">(.*?)</div>', r.text, re.S).group(1)
    assert "read-only (loopback)" in who and 'id="login-link"' in who, who
    assert re.search(r'<a href="/" id="error-back">back to the queue</a>', r.text)


def test_a_login_lockout_leads_back_to_the_login_form(c):
    page = c.get("/login", params={"next": "/search?q=flooded"}).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    for _ in range(20):
        r = c.post("/login", data={"username": "alice", "password": "wrong", "csrf": csrf,
                                   "next": "/search?q=flooded"})
        if r.status_code == 429:
            break
        assert r.status_code == 401
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    back = re.search(r'<a href="([^"]+)" id="error-back">([^<]+)</a>', r.text)
    assert back.group(2) == "back to the login form"
    target = unescape(back.group(1))
    assert target == "/login?next=/search%3Fq%3Dflooded", target
    # the link is the login form, on to the search the login was for
    form = c.get(target).text
    assert 'id="login-form"' in form and 'name="next" value="/search?q=flooded"' in form
    assert "read-only (loopback)" in re.search(r'<div class="who">(.*?)</div>', r.text, re.S).group(1)
