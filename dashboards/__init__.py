"""Grafana dashboards, Prometheus alert rules and Grafana provisioning for
deepwatch, as code. ``python -m dashboards.build --out DIR`` writes them;
``dashboards/generated/`` holds the committed output that deploy/ mounts."""

# grafana-foundation-sdk publishes one build per Grafana version under an
# epoch (a timestamp), so an unpinned install picks whichever built last (the
# 10.1 types, at the time of writing): pyproject.toml pins the Grafana 11.6
# types, and the generated artefacts are made with those.


def sdk_version() -> str:
    from importlib.metadata import version

    return version("grafana_foundation_sdk")
