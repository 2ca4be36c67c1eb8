"""Grafana dashboards, Prometheus alert rules and Grafana provisioning for
deepwatch, as code. ``python -m dashboards.build --out DIR`` writes them;
``dashboards/generated/`` holds the committed output that deploy/ mounts."""
