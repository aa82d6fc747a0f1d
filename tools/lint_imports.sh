#!/usr/bin/env bash
# The layering contract (pyproject.toml [tool.importlinter]) checked with import-linter on a
# non-editable install of this checkout in a temporary folder: the editable install maps
# passes/ and runtimes/ into the package through an import hook that import-linter's module
# discovery does not follow, so it would not see them. Run from tools/test.sh (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
python -m pip install -q --no-deps --no-build-isolation --target "$site" . >/dev/null 2>&1
# from the temporary folder: lint-imports puts the working directory first on sys.path
config="$PWD/pyproject.toml"
cd "$site" && PYTHONPATH="$site" lint-imports --config "$config"
