#!/usr/bin/env bash
# FT gate benchmark: spm (candle) and transformers' CLIPTextModel on the same
# CLIP-L-sized random text encoder, 2 threads, in one run.
#   PYTHON=/path/to/venv/bin/python bench/gate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TE=bench/work/clip_l/text_encoder
cargo build --release --example gate_bench --bin spm
echo "== torch (transformers CLIPTextModel), builds the model on first use"
HF_HUB_OFFLINE=1 "$PY" bench/torch_clip_latency.py "$TE" --threads 2
echo "== spm"
RAYON_NUM_THREADS=2 target/release/examples/gate_bench "$TE" target/release/spm
