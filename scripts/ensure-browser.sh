#!/usr/bin/env bash
# The chat page's test drives Debian's headless chromium; install it when it is missing (as root).
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium + chromium-driver for the chat page test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "warning: could not install chromium; the browser test will fail"
else
  echo "warning: chromium/chromedriver missing and not root: install them for the browser test"
fi
exit 0
