#!/bin/sh
# Debian's Chromium and its WebDriver for tests/test_browser.py (JupyterLab in a real browser).
# The test drives these system binaries only: nothing is downloaded when it runs.
# Idempotent: does nothing when both are already installed. Needs root (or sudo) and apt.
set -eu
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
test -x /usr/bin/chromium && test -x /usr/bin/chromedriver
