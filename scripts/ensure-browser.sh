#!/usr/bin/env bash
# The chat page's test (tests/test_server_browser.py) drives Debian's headless chromium. When it is
# missing, this says so and, as root with apt, installs chromium + chromium-driver system-wide (outside
# the virtualenv) after announcing it. Skip it with LOWGEAR_NO_BROWSER=1 (make test NO_BROWSER=1):
# nothing is installed and the browser test is skipped.
set -u
if [ -n "${LOWGEAR_NO_BROWSER:-}" ] && [ "${LOWGEAR_NO_BROWSER}" != 0 ]; then
  echo "LOWGEAR_NO_BROWSER is set: not installing chromium; the chat page's browser test (tests/test_server_browser.py) is skipped"
  exit 0
fi
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "about to install chromium + chromium-driver with apt-get, system-wide (outside the virtualenv), for the chat"
  echo "page's browser test; to skip this and that test, stop now (Ctrl-C) and run: make test NO_BROWSER=1"
  if [ -t 0 ]; then sleep 5; fi
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    && echo "installed chromium + chromium-driver" \
    || echo "warning: could not install chromium; the browser test will be skipped"
else
  echo "chromium/chromedriver missing and not root: the browser test is skipped (install them as root to run it)"
fi
exit 0
