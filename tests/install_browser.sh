#!/usr/bin/env bash
# Headless Chromium + its WebDriver from Debian for tests/test_demo_browser.py (skipped only when these are missing).
# Run as root (CI) or through sudo. Browser-download tools (playwright install) cannot reach the internet here.
set -euo pipefail
if command -v chromium >/dev/null && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
