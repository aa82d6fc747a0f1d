#!/usr/bin/env bash
# The README's test command: install gate2deploy with its test extras, build the native
# custom-op library, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
# Headless Chromium for the profile report's render test (tests/test_profile_report.py):
# Debian's package, installed only when missing and only where we are root.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# Build (or find cached) the native custom-op library up front, so a missing compiler or
# header download fails here with one clear line (runtimes/native_build.py).
python -m gate2deploy.runtimes.native_build
# The one-way layering contract (import-linter; pyproject.toml [tool.importlinter]).
bash tools/lint_imports.sh
python -m pytest -q
