#!/usr/bin/env bash
# `make browser`: make the browsers of the report's browser tests (tests/test_browser.py) available:
# Debian's chromium and firefox-esr (headless screenshots, Chromium's print to PDF) and poppler-utils
# (pdftoppm: the printed pages as images); and dicom3tools (dciodvfy: the DICOM export's objects
# checked against the standard's IODs, tests/test_dicom_export_extras.py). Optional: `make test` does
# not run it, and those tests skip, naming this step, when a tool is absent. Never fails: where the
# packages cannot be installed (no root, no apt-get, no network) it says why.
set -u
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v firefox >/dev/null 2>&1 || command -v firefox-esr >/dev/null 2>&1 || missing+=(firefox-esr)
command -v pdftoppm >/dev/null 2>&1 || missing+=(poppler-utils)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
if [ "${#missing[@]}" -eq 0 ]; then
  echo "make browser: chromium, firefox, pdftoppm and dciodvfy are installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "make browser: no apt-get on this machine; install ${missing[*]} by hand to run the browser tests" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "make browser: not root and no password-less sudo; run 'sudo apt-get install ${missing[*]}'" >&2
  exit 0
fi
log="${TMPDIR:-/tmp}/perfusion-make-browser.log"
echo "make browser: installing ${missing[*]} with apt-get (once; a few hundred MB; log: $log)"
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
       --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  echo "make browser: apt-get failed (log: $log); the browser and dciodvfy tests will skip" >&2
fi
exit 0
