#!/usr/bin/env bash
# Everything: the Rust suite, then the WebUI extension's pytest suite against
# the `spm` binary cargo test built. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"

if [ ! -x .venv-test/bin/python ]; then
    echo "== creating .venv-test"
    "$PY" -m venv .venv-test
fi
# --no-cache-dir: torch's wheel and its CUDA libraries are ~5 GB installed;
# pip's cache would keep a second, compressed copy (~3 GB) that no later
# step reads. `df` first, so a disk-full failure shows what was free.
echo "== free disk before installing: $(df -h . | awk 'NR==2 {print $4}')"
echo "== installing test dependencies (pytest numpy safetensors torch; diffusers peft for tests/oracle)"
.venv-test/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check \
    pytest numpy safetensors torch diffusers==0.42.1 peft==0.21.2 transformers

echo "== cargo test"
cargo test

# The extension's suite drives the debug binary `cargo test` just built: the
# tiny fixture models make it fast enough, and a release build would add
# ten minutes on two cores (SPM_BIN=target/release/spm to use one).
echo "== pytest extension/tests (against target/debug/spm)"
SPM_BIN="${SPM_BIN:-$ROOT/target/debug/spm}" .venv-test/bin/python -m pytest -q -rs extension/tests

# spm extract's output loaded by diffusers + peft themselves (tiny SD1 UNet).
echo "== pytest tests/oracle (diffusers/peft load what spm extract wrote)"
SPM_BIN="${SPM_BIN:-$ROOT/target/debug/spm}" HF_HUB_OFFLINE=1 .venv-test/bin/python -m pytest -q -rs tests/oracle
