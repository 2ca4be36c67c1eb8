"""Grafana file provisioning: the Prometheus datasource and the dashboard
provider that loads the generated dashboard JSON.

Paths are the ones deploy/compose.yaml and deploy/k8s mount into the Grafana
container; the datasource URL is the `prometheus` service name in both.
"""

from __future__ import annotations

from typing import Any

from dashboards import desk
from dashboards.dashboard import DATASOURCE_UID
from dashboards.rules import DESK_FOLDER_TITLE, DESK_FOLDER_UID

PROMETHEUS_URL = "http://prometheus:9090"
ELASTICSEARCH_URL = "http://elasticsearch:9200"  # compose service / k8s Service name
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
    }] + [_es(uid, index, time_field) for uid, index, time_field in (
        (desk.ES_CLUSTERS_UID, "deepwatch-clusters", "last_seen"),
        (desk.ES_SIGHTINGS_UID, "deepwatch-sightings", "@timestamp"),
        (desk.ES_ALERTS_UID, "deepwatch-alerts", "created_at"),
    )]}


def _es(uid: str, index: str, time_field: str) -> dict[str, Any]:
    # read-only findings access: an API key from the Grafana container's
    # environment (Grafana expands $VARS in provisioning files)
    return {
        "name": uid, "uid": uid, "type": "elasticsearch", "access": "proxy", "url": ELASTICSEARCH_URL,
        "editable": False,
        "jsonData": {"index": index, "timeField": time_field, "interval": "", "maxConcurrentShardRequests": 5,
                     "logMessageField": "", "logLevelField": "", "includeFrozen": False,
                     "httpHeaderName1": "Authorization"},
        "secureJsonData": {"httpHeaderValue1": "ApiKey $DEEPWATCH_GRAFANA_ES_API_KEY"},
    }


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
