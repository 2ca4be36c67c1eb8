"""Upload the dashboards, the desk alert rules, contact points and the
notification policy to a running Grafana, with grafana-client.

For Grafanas that are not file-provisioned from dashboards/generated (a shared
or hosted instance). ``deepwatch grafana provision --url URL`` (token from
``GRAFANA_TOKEN``, or ``--token``) or, equivalently,

    GRAFANA_URL=https://grafana.example GRAFANA_TOKEN=glsa_... python -m dashboards.publish

The token is a service-account token with dashboard, alert-rule and
notification write access. Contact-point addresses come from the same
environment variables the provisioning files name (DEEPWATCH_DESK_WEBHOOK_URL,
DEEPWATCH_DESK_SLACK_WEBHOOK_URL, DEEPWATCH_DESK_EMAILS); a receiver whose
variable is unset is left out and reported.
"""

from __future__ import annotations

import os
import sys
import re
from dataclasses import dataclass, field
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaTimeoutError
from niquests.exceptions import JSONDecodeError  # what grafana-client raises for a 2xx answer that is not JSON

from dashboards import desk, rules
from dashboards.dashboard import DASHBOARD_UID, DATASOURCE_UID, dashboard_json


class PublishError(Exception):
    pass


@dataclass
class Published:
    grafana_version: str
    folder_uid: str
    dashboard_url: str  # the pipeline-health dashboard (kept first for compatibility)
    dashboard_version: int
    rule_group: str
    datasource_found: bool
    dashboard_urls: dict[str, str] = field(default_factory=dict)  # uid -> url, every dashboard
    contact_points: list[str] = field(default_factory=list)  # receiver uids created or updated
    skipped_receivers: list[str] = field(default_factory=list)  # env var unset
    missing_datasources: list[str] = field(default_factory=list)


def dashboards() -> dict[str, dict[str, Any]]:
    return {DASHBOARD_UID: dashboard_json(), desk.VIRAL_UID: desk.viral_json(), desk.SPREAD_UID: desk.spread_json()}


def client_from_env(timeout: float = 10.0, *, url: str | None = None, token: str | None = None) -> GrafanaApi:
    url = url or os.environ.get("GRAFANA_URL")
    token = token or os.environ.get("GRAFANA_TOKEN")
    if not url:
        raise PublishError("GRAFANA_URL is not set")
    if not token:
        raise PublishError("GRAFANA_TOKEN is not set (a service-account token; basic auth is not used)")
    return GrafanaApi.from_url(url, credential=token, timeout=timeout)


def _ensure_folder(api: GrafanaApi) -> str:
    try:
        return api.folder.get_folder(rules.DESK_FOLDER_UID)["uid"]
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
    return api.folder.create_folder(rules.DESK_FOLDER_TITLE, uid=rules.DESK_FOLDER_UID)["uid"]


def _datasource_exists(api: GrafanaApi, uid: str = DATASOURCE_UID) -> bool:
    try:
        api.datasource.get_datasource_by_uid(uid)
        return True
    except GrafanaClientError as e:
        if e.status_code == 404:
            return False
        raise


_ENV = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)\}?")
# Receiver settings that may resolve to nothing (then left out), by the setting, not the variable's name.
_OPTIONAL_SETTINGS = frozenset({"authorization_credentials"})


def resolved_receivers(env: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The desk contact point's receivers as the HTTP API takes them, with
    the environment references of the provisioning file filled in here
    (the API does not expand them). Receivers missing a variable of a
    required setting are skipped."""
    env = os.environ if env is None else env
    out, skipped = [], []
    for cp in rules.contact_points():
        for r in cp["receivers"]:
            # an optional setting (the webhook's bearer token) may stay empty; the address itself may not
            required = sorted({n for k, v in r["settings"].items() if k not in _OPTIONAL_SETTINGS and isinstance(v, str)
                               for n in _ENV.findall(v) if not env.get(n)})
            if required:
                skipped.append(f"{r['uid']} ({', '.join(required)} unset)")
                continue
            settings = {k: _ENV.sub(lambda m: env.get(m.group(1), ""), v) if isinstance(v, str) else v
                        for k, v in r["settings"].items()}
            settings = {k: v for k, v in settings.items() if v != ""}
            if not settings.get("authorization_credentials"):
                settings.pop("authorization_scheme", None)
            out.append({"uid": r["uid"], "name": cp["name"], "type": r["type"], "settings": settings,
                        "disableResolveMessage": r["disableResolveMessage"]})
    return out, skipped


def _upsert_contact_points(api: GrafanaApi, receivers: list[dict[str, Any]]) -> list[str]:
    existing = {cp.get("uid") for cp in api.alertingprovisioning.get_contactpoints() or []}
    done = []
    for r in receivers:
        if r["uid"] in existing:
            api.alertingprovisioning.update_contactpoint(r["uid"], r, disable_provenance=True)
        else:
            api.alertingprovisioning.create_contactpoint(r, disable_provenance=True)
        done.append(r["uid"])
    return done


def publish(api: GrafanaApi, *, message: str = "deepwatch: dashboards.publish") -> Published:
    """Create or replace the deepwatch folder, dashboards, desk rule group,
    desk contact point and notification policy."""
    try:
        health = _build_info(api)
        folder_uid = _ensure_folder(api)
        urls: dict[str, str] = {}
        first: dict[str, Any] = {}
        for uid, doc in dashboards().items():
            # overwrite: the generated dashboard is the source of truth, whatever
            # version the server holds (a UI edit would otherwise fail with 412).
            saved: dict[str, Any] = api.dashboard.update_dashboard({
                "dashboard": {**doc, "id": None}, "folderUid": folder_uid, "overwrite": True, "message": message,
            })
            if saved.get("status") != "success":
                raise PublishError(f"Grafana did not save dashboard {uid}: {saved}")
            urls[uid] = saved["url"]
            first = first or saved
        group = rules.desk_rule_group_api()
        api.alertingprovisioning.update_rule_group(folder_uid, group["title"], group, disable_provenance=True)
        receivers, skipped = resolved_receivers()
        contact_points = _upsert_contact_points(api, receivers) if receivers else []
        if contact_points:
            policy = {k: v for k, v in rules.notification_policy().items() if k != "orgId"}
            api.alertingprovisioning.set_notification_policy_tree(policy, disable_provenance=True)
        found = _datasource_exists(api)
        missing = [uid for uid in (desk.ES_CLUSTERS_UID, desk.ES_SIGHTINGS_UID, desk.ES_ALERTS_UID)
                   if not _datasource_exists(api, uid)]
    except GrafanaTimeoutError as e:  # not a refusal: nothing answered in time
        raise PublishError(f"Grafana did not answer in time ({e}); check the URL, or allow more time "
                           "(deepwatch grafana provision --timeout)") from e
    except GrafanaException as e:
        raise PublishError(refusal_message(e)) from e
    except JSONDecodeError as e:  # a 2xx answer that is not JSON (nor text/*): not Grafana's API
        shown = excerpt(str(getattr(e, "doc", "") or ""))
        raise PublishError(f"the answer was not JSON{f' ({shown!r})' if shown else ''}: {NOT_GRAFANA_HINT}") from e
    return Published(
        grafana_version=str(health.get("version", "unknown")), folder_uid=folder_uid,
        dashboard_url=first["url"], dashboard_version=int(first["version"]), rule_group=group["title"],
        datasource_found=found, dashboard_urls=urls, contact_points=contact_points, skipped_receivers=skipped,
        missing_datasources=missing,
    )


NOT_GRAFANA_HINT = "is the URL Grafana's own address (e.g. https://grafana.example)?"
EXCERPT_CHARS = 120
_SETTINGS_PATH = "/frontend/settings"  # what grafana-client's health.check reads (Amazon Managed Grafana too)
_TAG = re.compile(r"<[^>]*>|<!--.*?-->", re.DOTALL)
_DROPPED = re.compile(r"<(script|style)\b.*?</\1\s*>|<head\b.*?</head\s*>", re.DOTALL | re.IGNORECASE)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """A server's answer as a few words on one line: markup, scripts and
    styles dropped, entities decoded, whitespace runs and newlines made one
    space, at most ``limit`` characters."""
    import html

    words = " ".join(html.unescape(_TAG.sub(" ", _DROPPED.sub(" ", text))).split())
    return words if len(words) <= limit else words[:limit - 1].rstrip() + "…"


def refusal_message(e: GrafanaException, *, not_grafana: bool = False) -> str:
    """One line for an error answer: its status, what it said (Grafana's
    {"message": ...}, else an excerpt of the body), and, when the answer is
    not Grafana's JSON (a web page, or a 404 without a message), the
    question whether the URL is Grafana's (``not_grafana``: ask it anyway).
    A 404 page of some other server was printed whole: a dozen lines of
    HTML, and no hint."""
    status = e.status_code
    response = e.response
    if isinstance(response, dict) and "message" in response:
        said, grafana_like = excerpt(str(response["message"])), True
    elif isinstance(response, (dict, list)):  # JSON without a message
        said, grafana_like = excerpt(str(response)), status != 404
    elif isinstance(response, str):  # not JSON: a web page, plain text, an empty body
        said, grafana_like = excerpt(response), False
    else:  # no answer at all (status 0: the request failed) or a library message only
        said, grafana_like = excerpt(str(e.message or e).strip().rstrip(":")), True
    status_text = f"HTTP {status} {_reason(status)}".rstrip() if status else "no HTTP answer"
    line = f"Grafana refused the request ({status_text}): {said or 'no message'}"
    return line if grafana_like and not not_grafana else f"{line}; {NOT_GRAFANA_HINT}"


def _build_info(api: GrafanaApi) -> dict[str, Any]:
    """Grafana's build information, as ``api.health.check()`` reads it; a
    server whose answer is not Grafana's (a web page answering 200, JSON
    without buildInfo) is one line with the hint, where health.check ended
    on "'str' object has no attribute 'get'"."""
    try:
        answer = api.client.GET(_SETTINGS_PATH)
    except GrafanaClientError as e:
        if e.status_code == 404:  # every Grafana serves it: whatever answered is not Grafana's API
            raise PublishError(refusal_message(e, not_grafana=True)) from e
        raise
    info = answer.get("buildInfo") if isinstance(answer, dict) else None
    if not isinstance(info, dict):
        shown = excerpt(answer if isinstance(answer, str) else repr(answer)) or "nothing"
        raise PublishError(f"/api{_SETTINGS_PATH} answered {shown!r}, not Grafana's settings: {NOT_GRAFANA_HINT}")
    return info


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def report(result: Published, base: str) -> list[str]:
    """What to tell the operator: one line per thing done or missing (stderr for warnings)."""
    lines = [f"dashboard {base}{url}" for url in result.dashboard_urls.values()]
    lines.append(f"rule group {result.rule_group}; contact points: {', '.join(result.contact_points) or 'none'}")
    return lines


def warnings(result: Published) -> list[str]:
    out = []
    if not result.datasource_found:
        out.append(f"warning: no datasource with uid {DATASOURCE_UID!r}; panels stay empty until one exists "
                   "(see dashboards/generated/grafana/provisioning/datasources)")
    for uid in result.missing_datasources:
        out.append(f"warning: no Elasticsearch datasource {uid!r}: the desk dashboards and the viral-fake rule need it")
    for r in result.skipped_receivers:
        out.append(f"warning: receiver {r}: not provisioned")
    if not result.contact_points:
        out.append("warning: no contact point provisioned, notification policy left as it was")
    return out


def main() -> int:
    try:
        result = publish(client_from_env())
    except PublishError as e:
        print(f"publish failed: {e}", file=sys.stderr)
        return 1
    base = os.environ["GRAFANA_URL"].rstrip("/")
    for line in report(result, base):
        print(line)
    for line in warnings(result):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
