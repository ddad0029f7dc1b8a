#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_app_e2e.py), idempotently.
# The test drives /usr/bin/chromium through Playwright; `playwright install` (which
# downloads its own browser build) is never used. Without root or apt-get this script
# says so and exits 0: the browser test then skips itself.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null | head -n 1))"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium: apt-get not found; install Chromium at /usr/bin/chromium by hand (the browser test skips)" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "chromium: not root and no passwordless sudo; skipping (the browser test skips)" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq || ! $SUDO apt-get install -y -qq chromium >/dev/null; then
    echo "chromium: apt-get failed; the browser test skips" >&2
    exit 0
fi
echo "chromium: installed ($(/usr/bin/chromium --version 2>/dev/null | head -n 1))"
