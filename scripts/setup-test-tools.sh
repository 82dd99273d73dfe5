#!/usr/bin/env bash
# What the tests need beyond the engine and the venv: Chromium from Debian's packages, to render the HTML
# report in a real headless browser (tests/test_reports.py). Idempotent: installs only what is missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "labrat setup: chromium is missing; run this script as root (or: sudo apt-get install chromium)" >&2
  exit 1
fi
echo "labrat setup: installing chromium (headless HTML checks in the tests)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
