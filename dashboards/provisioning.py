"""Grafana file provisioning: the Prometheus datasource and the dashboard
provider that loads the generated dashboard JSON.

Paths are the ones deploy/compose.yaml and deploy/k8s mount into the Grafana
container; the datasource URL is the `prometheus` service name in both.
"""

from __future__ import annotations

from typing import Any

from dashboards.dashboard import DATASOURCE_UID
from dashboards.rules import DESK_FOLDER_TITLE, DESK_FOLDER_UID

PROMETHEUS_URL = "http://prometheus:9090"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/deepwatch"  # where deploy/ mounts generated/grafana/dashboards


def datasources() -> dict[str, Any]:
    return {"apiVersion": 1, "datasources": [{
        "name": "deepwatch-prometheus",
        "uid": DATASOURCE_UID,  # dashboards and the desk rule reference this uid, never the name
        "type": "prometheus",
        "access": "proxy",
        "url": PROMETHEUS_URL,
        "isDefault": True,
        "editable": False,
        # match the scrape interval so $__rate_interval never spans < 4 samples
        "jsonData": {"timeInterval": "15s", "httpMethod": "POST"},
    }]}


def dashboard_providers() -> dict[str, Any]:
    return {"apiVersion": 1, "providers": [{
        "name": "deepwatch",
        "orgId": 1,
        "folder": DESK_FOLDER_TITLE,
        "folderUid": DESK_FOLDER_UID,
        "type": "file",
        "disableDeletion": True,
        # edits belong in dashboards/dashboard.py; UI changes would be lost on the next provisioning run
        "allowUiUpdates": False,
        "updateIntervalSeconds": 60,
        "options": {"path": DASHBOARDS_PATH, "foldersFromFilesStructure": False},
    }]}
