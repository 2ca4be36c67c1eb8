"""Grafana file provisioning: the Prometheus and findings (Elasticsearch)
datasources and the dashboard provider that loads the generated dashboard JSON.

The committed files (``dashboards/generated``) are compose's: deploy/compose.yaml
mounts them into its Grafana, whose datasources reach the ``prometheus`` and
``elasticsearch`` services by name over plain http. Kubernetes ships no Grafana:
for yours, generate the files with the addresses it reaches (``python -m
dashboards.build --out DIR --kubernetes --prometheus-url URL``; deploy/README.md):
ECK's Elasticsearch service across namespaces, over https with ECK's private CA,
which Grafana reads from ``$DEEPWATCH_GRAFANA_ES_CA_CERT``.
"""

from __future__ import annotations

import re
from typing import Any

from dashboards import desk
from dashboards.dashboard import DATASOURCE_UID
from dashboards.rules import DESK_FOLDER_TITLE, DESK_FOLDER_UID

PROMETHEUS_URL = "http://prometheus:9090"  # the compose service (Kubernetes: your Prometheus, --prometheus-url)
ELASTICSEARCH_URL = "http://elasticsearch:9200"  # the compose service (deploy/deepwatch.toml's findings url)
# Kubernetes (deploy/k8s): ECK's HTTP service for the Elasticsearch named "deepwatch"
# (overlays/eck) in the namespace "deepwatch", named whole so that a Grafana in another
# namespace resolves it; https, with a certificate ECK's own CA signs.
KUBERNETES_ELASTICSEARCH_URL = "https://deepwatch-es-http.deepwatch.svc:9200"
# Grafana's environment variable holding that CA's PEM (ECK's Secret
# deepwatch-es-http-certs-public, key ca.crt); Grafana expands $NAME in provisioning files
KUBERNETES_ES_CA_CERT_ENV = "DEEPWATCH_GRAFANA_ES_CA_CERT"
DEFAULT_INDEX_PREFIX = "deepwatch"  # findings.index_prefix's default
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/deepwatch"  # where deploy/ mounts generated/grafana/dashboards

_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def check_index_prefix(prefix: str) -> str:
    """``findings.index_prefix``'s rule (``streams.settings.check_index_prefix``),
    naming the setting the dashboards must agree with."""
    from streams.settings import check_index_prefix as rule

    try:
        return rule(prefix)
    except ValueError as e:
        raise ValueError(f"{e}: give the workers' findings.index_prefix") from None


def datasources(*, prometheus_url: str = PROMETHEUS_URL, es_url: str = ELASTICSEARCH_URL,
                es_ca_cert_env: str | None = None, index_prefix: str = DEFAULT_INDEX_PREFIX) -> dict[str, Any]:
    """``es_url``: Elasticsearch as Grafana reaches it; ``es_ca_cert_env``: the
    Grafana environment variable holding the PEM of the CA that signed its
    certificate (None: the system's CAs, or plain http); ``index_prefix``: the
    workers' ``findings.index_prefix``."""
    from streams.es_templates import names

    if es_ca_cert_env is not None and not _ENV_NAME.fullmatch(es_ca_cert_env):
        raise ValueError(f"{es_ca_cert_env!r} is not an environment variable name (A-Z, 0-9, _)")
    index = names(check_index_prefix(index_prefix))
    return {"apiVersion": 1, "datasources": [{
        "name": "deepwatch-prometheus",
        "uid": DATASOURCE_UID,  # dashboards and the desk rule reference this uid, never the name
        "type": "prometheus",
        "access": "proxy",
        "url": prometheus_url,
        "isDefault": True,
        "editable": False,
        # match the scrape interval so $__rate_interval never spans < 4 samples
        "jsonData": {"timeInterval": "15s", "httpMethod": "POST"},
    }] + [_es(uid, index[kind], time_field, es_url, es_ca_cert_env) for uid, kind, time_field in (
        (desk.ES_CLUSTERS_UID, "clusters", "last_seen"),
        (desk.ES_SIGHTINGS_UID, "sightings", "@timestamp"),
        (desk.ES_ALERTS_UID, "alerts", "created_at"),
    )]}


def _es(uid: str, index: str, time_field: str, url: str, ca_cert_env: str | None) -> dict[str, Any]:
    # read-only findings access: an API key from the Grafana container's
    # environment (Grafana expands $VARS in provisioning files)
    ds: dict[str, Any] = {
        "name": uid, "uid": uid, "type": "elasticsearch", "access": "proxy", "url": url,
        "editable": False,
        "jsonData": {"index": index, "timeField": time_field, "interval": "", "maxConcurrentShardRequests": 5,
                     "logMessageField": "", "logLevelField": "", "includeFrozen": False,
                     "httpHeaderName1": "Authorization"},
        "secureJsonData": {"httpHeaderValue1": "ApiKey $DEEPWATCH_GRAFANA_ES_API_KEY"},
    }
    if ca_cert_env:  # verify the server's certificate against this CA (never tlsSkipVerify)
        ds["jsonData"]["tlsAuthWithCACert"] = True
        ds["secureJsonData"]["tlsCACert"] = f"${ca_cert_env}"
    return ds


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
