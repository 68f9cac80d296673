#!/usr/bin/env bash
# Fresh venv, install with the test extra, run the whole suite (CPU). Used verbatim by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QEFT_TEST_VENV:-.venv-test}"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -m pytest -q --timeout=900 tests "$@"
