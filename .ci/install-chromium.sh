#!/usr/bin/env bash
# Installs Debian's chromium for the desk's browser tests (tests/test_desk_browser.py),
# which drive it with Playwright for Python through executable_path (Playwright's own
# browser download is not used). Idempotent and quiet when already installed; without
# it those tests skip with a reason rather than fail.
set -euo pipefail
if command -v chromium >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-chromium: not root or no apt-get; desk browser tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
  echo "install-chromium: apt-get failed; desk browser tests will skip" >&2
  exit 0
fi
