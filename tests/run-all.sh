#!/usr/bin/env bash
# Everything: the Rust suite, then the WebUI extension's pytest suite against
# the release `spm` binary. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"

if [ ! -x .venv-test/bin/python ]; then
    echo "== creating .venv-test"
    "$PY" -m venv .venv-test
fi
echo "== installing test dependencies (pytest numpy safetensors torch)"
.venv-test/bin/python -m pip install -q --disable-pip-version-check pytest numpy safetensors torch

echo "== cargo test"
cargo test

echo "== cargo build --release --bin spm"
cargo build --release --bin spm

echo "== pytest extension/tests"
SPM_BIN="${SPM_BIN:-$ROOT/target/release/spm}" .venv-test/bin/python -m pytest -q -rs extension/tests
