#!/usr/bin/env bash
# The README's test command: install gate2deploy with its test extras, build the native
# custom-op library, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test]'
python -m pytest -q
