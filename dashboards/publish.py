"""Upload the dashboard and the desk alert rule to a running Grafana.

For Grafanas that are not file-provisioned from dashboards/generated (a shared
or hosted instance). Configuration comes from the environment only, so a token
never lands in a command line or a file: ``GRAFANA_URL`` and ``GRAFANA_TOKEN``
(a service-account token with dashboard and alert-rule write access).

    GRAFANA_URL=https://grafana.example GRAFANA_TOKEN=glsa_... python -m dashboards.publish
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

from dashboards import rules
from dashboards.dashboard import DATASOURCE_UID, dashboard_json


class PublishError(Exception):
    pass


@dataclass
class Published:
    grafana_version: str
    folder_uid: str
    dashboard_url: str
    dashboard_version: int
    rule_group: str
    datasource_found: bool


def client_from_env(timeout: float = 10.0) -> GrafanaApi:
    url = os.environ.get("GRAFANA_URL")
    token = os.environ.get("GRAFANA_TOKEN")
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


def _datasource_exists(api: GrafanaApi) -> bool:
    try:
        api.datasource.get_datasource_by_uid(DATASOURCE_UID)
        return True
    except GrafanaClientError as e:
        if e.status_code == 404:
            return False
        raise


def publish(api: GrafanaApi, *, message: str = "deepwatch: dashboards.publish") -> Published:
    """Create or replace the deepwatch folder, dashboard and desk rule group."""
    try:
        health = api.health.check()
        folder_uid = _ensure_folder(api)
        # overwrite: the generated dashboard is the source of truth, whatever
        # version the server holds (a UI edit would otherwise fail with 412).
        saved: dict[str, Any] = api.dashboard.update_dashboard({
            "dashboard": {**dashboard_json(), "id": None},
            "folderUid": folder_uid, "overwrite": True, "message": message,
        })
        if saved.get("status") != "success":
            raise PublishError(f"Grafana did not save the dashboard: {saved}")
        group = rules.desk_rule_group_api()
        api.alertingprovisioning.update_rule_group(folder_uid, group["title"], group, disable_provenance=True)
        found = _datasource_exists(api)
    except GrafanaException as e:
        # grafana-client's message carries the server's {"message": ...}; say which call failed.
        raise PublishError(f"Grafana refused the request: {e}") from e
    return Published(
        grafana_version=str(health.get("version", "unknown")), folder_uid=folder_uid,
        dashboard_url=saved["url"], dashboard_version=int(saved["version"]), rule_group=group["title"],
        datasource_found=found,
    )


def main() -> int:
    try:
        result = publish(client_from_env())
    except PublishError as e:
        print(f"publish failed: {e}", file=sys.stderr)
        return 1
    base = os.environ["GRAFANA_URL"].rstrip("/")
    print(f"dashboard {base}{result.dashboard_url} (version {result.dashboard_version}), rule group {result.rule_group}")
    if not result.datasource_found:
        print(f"warning: no datasource with uid {DATASOURCE_UID!r}; panels stay empty until one exists "
              "(see dashboards/generated/grafana/provisioning/datasources)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
