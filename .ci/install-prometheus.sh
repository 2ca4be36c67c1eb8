#!/usr/bin/env bash
# Installs Debian's prometheus (prometheus + promtool) and alertmanager (amtool)
# for tests/test_prometheus.py. Idempotent and quiet when already installed;
# without them those tests skip with a reason rather than fail.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v amtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-prometheus: not root or no apt-get; Prometheus tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# A package mirror hiccup must not fail the test run: the tests that need
# Prometheus skip (and say so) when it is absent.
if ! { apt-get update -qq && \
       apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null; }; then
  # --no-install-recommends above: the recommends pull in node-exporter & co.
  echo "install-prometheus: apt-get failed; Prometheus tests will skip" >&2
  exit 0
fi
# The Debian package may start a system prometheus on :9090; tests use their
# own instance on a free port and don't need it.
