#!/usr/bin/env bash
# Bake benchmark: one SD1 SPM into an SD1.5-size fp16 UNet (1.72 GB),
# side by side with a plain file copy and the usual torch merge script,
# in one run on the same warm page cache. Every command is timed with a
# trailing `sync`, so all of them pay for getting their output to disk.
#
#   bench/run.sh [runs]      (PYTHON=/path/to/python with torch+diffusers)
set -euo pipefail
cd "$(dirname "$0")/.."
W=bench/work
# Where outputs go: the disk by default; OUT=/dev/shm takes the disk out of
# the measurement (tmpfs), leaving the tools' own cost.
O=${OUT:-$W}
N=${1:-3}
PY=${PYTHON:-python3}
SPM=target/release/spm
[ -x "$SPM" ] || cargo build --release
[ -f "$W/sd15_ldm.safetensors" ] || HF_HUB_OFFLINE=1 "$PY" bench/make_sd15.py "$W"
BASE="$W/sd15/unet/diffusion_pytorch_model.safetensors"
LORA="$W/spm_sd15.safetensors"
cat "$BASE" "$LORA" > /dev/null # warm the page cache for everyone
: > "$W/times.txt"
measure() {
  local name=$1
  shift
  for _ in $(seq "$N"); do
    rm -rf "$O"/out*
    sync
    /usr/bin/time -f "$name %e %M" bash -c "$* >/dev/null && sync" 2>> "$W/times.txt"
  done
}
measure copy "cp $BASE $O/out.safetensors"
measure spm-bake "$SPM bake --base $W/sd15 $LORA -o $O/out"
measure spm-bake-ldm "$SPM bake --base $W/sd15_ldm.safetensors $LORA -o $O/out.safetensors"
measure torch "$PY bench/torch_bake.py $BASE $LORA $O/out.safetensors"
rm -rf "$O"/out*
# name, median seconds, median peak RSS (MB), ratio to copy
awk '{t[$1]=t[$1]" "$2; m[$1]=m[$1]" "$3} END {for (k in t) print k, t[k], "|", m[k]}' "$W/times.txt" |
  "$PY" -c '
import sys, statistics as st
rows = {}
for line in sys.stdin:
    name, rest = line.split(None, 1)
    ts, ms = rest.split("|")
    rows[name] = (st.median(map(float, ts.split())), st.median(map(float, ms.split())) / 1024)
base = rows["copy"][0]
print("%-14s %8s %12s %8s" % ("command", "seconds", "peak RSS MB", "vs copy"))
for k in ["copy", "spm-bake", "spm-bake-ldm", "torch"]:
    t, m = rows[k]
    print(f"{k:<14} {t:8.2f} {m:12.1f} {t/base:7.2f}x")
'
