#!/usr/bin/env bash
# Set up qkv in ./.venv.  Usage: ./setup.sh        (the library and the `qkv` command)
#                                ./setup.sh test   (plus what the tests need, Chromium included)
#                                ./setup.sh bench  (plus scikit-learn for the baselines)
# torch==2.13.0 goes in first: on our CI machines that is a local CPU build; anything that asked
# for plain `torch` first would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
pip install torch==2.13.0
if [ "${1:-}" = test ]; then
    pip install -e '.[test]'
    # The browser tests drive Debian's Chromium with Playwright (never a downloaded browser).
    if [ ! -x /usr/bin/chromium ]; then
        sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
        $sudo_ apt-get install -y -q chromium >/dev/null || { $sudo_ apt-get update -q >/dev/null && $sudo_ apt-get install -y -q chromium >/dev/null; }
    fi
elif [ "${1:-}" = bench ]; then
    pip install -e '.[bench]'
else
    pip install -e .
fi
