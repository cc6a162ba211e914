#!/usr/bin/env bash
# Create a fresh virtual environment (CPU build of torch), install the package with its test extra,
# and run the test suite. Usage: bash launch/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m venv --clear .venv-test
.venv-test/bin/pip install --quiet --upgrade pip
# torch==2.13.0 pins the CPU build; the package itself only asks for torch>=2.4.
.venv-test/bin/pip install --quiet "torch==2.13.0" -e ".[test]"
exec .venv-test/bin/python -m pytest tests -q -p no:cacheprovider "$@"
