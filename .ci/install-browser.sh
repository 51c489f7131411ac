#!/usr/bin/env bash
# Installs Debian's chromium and chromedriver for tests/test_server_browser.py, when missing.
# CI runs as root with Debian's package registry reachable; elsewhere this is a no-op if both exist.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if have sudo; then SUDO="sudo"; else
        echo "install-browser: not root and no sudo; skipping (browser tests will be skipped)" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
chromium --version
chromedriver --version
