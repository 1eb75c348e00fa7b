#!/usr/bin/env bash
# UNet forward, spm (candle) vs diffusers/torch, same machine, same run.
# Usage: bench/unet_forward.sh [latent=64] [runs=3] [python=/path/to/venv/bin/python] [arch=sd15|sdxl]
set -euo pipefail
cd "$(dirname "$0")/.."
LATENT="${1:-64}"; RUNS="${2:-3}"; PY="${3:-python3}"; ARCH="${4:-sd15}"
THREADS="${RAYON_NUM_THREADS:-$(nproc)}"
cargo build --release --example unet_bench >/dev/null
echo "== spm (candle, $THREADS threads)"
RAYON_NUM_THREADS="$THREADS" target/release/examples/unet_bench "$LATENT" "$RUNS" "$ARCH"
echo "== diffusers (torch, $THREADS threads)"
OMP_NUM_THREADS="$THREADS" "$PY" bench/unet_torch.py "$LATENT" "$RUNS" "$THREADS" "$ARCH"
