#!/usr/bin/env bash
# A whole generation, spm vs diffusers vs stable-diffusion.cpp, from the same
# SD1 LDM single file, same prompt/seed/steps/size/CFG, same thread count.
# Usage: bench/generate.sh CKPT [steps=20] [size=512] [diffusers-python] [sdcpp-python]
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT="$1"; STEPS="${2:-20}"; SIZE="${3:-512}"; PY="${4:-python3}"; SDPY="${5:-python3}"
T="${RAYON_NUM_THREADS:-$(nproc)}"
OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT
cargo build --release --bin spm >/dev/null
"$PY" bench/sd15_config.py "$OUT/cfg" >/dev/null
echo "== spm (PNDM/PLMS, the model's default)"
/usr/bin/time -f '{"spm_wall_s": %e, "spm_peak_rss_mb": %M}' env RAYON_NUM_THREADS="$T" \
  target/release/spm generate --model "$CKPT" --steps "$STEPS" --size "${SIZE}x${SIZE}" --seed 0 \
  "a photo of a cat" -o "$OUT/spm" --json | grep -E '"seconds"'
echo "(peak RSS above is in KB)"
echo "== diffusers (PNDM, same seed: same initial latent)"
OMP_NUM_THREADS="$T" "$PY" bench/generate_diffusers.py "$CKPT" "$OUT/cfg" "$OUT/diffusers.png" "$STEPS" "$SIZE" "$T"
echo "== stable-diffusion.cpp (Euler, f32)"
OMP_NUM_THREADS="$T" "$SDPY" bench/generate_sdcpp.py "$CKPT" "$OUT/sdcpp.png" "$STEPS" "$SIZE" "$T"
if "$PY" -c "import numpy, PIL" 2>/dev/null; then
  "$PY" -c "
import numpy as np, PIL.Image as I, glob, sys
a = np.asarray(I.open(glob.glob('$OUT/spm/*.png')[0])).astype(int)
b = np.asarray(I.open('$OUT/diffusers.png')).astype(int)
print('spm vs diffusers image: max |diff|', np.abs(a-b).max(), 'of 255; mean', round(float(np.abs(a-b).mean()), 3))"
fi
