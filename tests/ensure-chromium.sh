#!/usr/bin/env bash
# Test set-up: make Debian's chromium available for the report's browser test (test_browser.py).
# Never fails the build: where chromium cannot be installed (no root, no apt, no network) it says why
# and the browser test skips with that reason.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: no apt-get on this machine; install Chromium by hand to run the browser test" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "ensure-chromium: not root and no password-less sudo; run 'sudo apt-get install chromium' to enable the browser test" >&2
  exit 0
fi
echo "ensure-chromium: installing Debian's chromium for the browser test (once)" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } >/tmp/ensure-chromium.log 2>&1; then
  echo "ensure-chromium: apt-get failed (log: /tmp/ensure-chromium.log); the browser test will skip" >&2
fi
exit 0
