#!/usr/bin/env bash
# One training step per method, spm (candle) vs torch/diffusers, same machine, same run.
# Usage: bench/train_step.sh [runs_tiny=5] [runs_sd15=2] [python=python3]
#   env: THREADS (2), OUT (result folder), MODELS ("tiny8 tiny32 sd15"),
#        METHODS ("spm esd-x fmn"), SPM_VMEM_KB (address-space cap for the
#        spm processes, so a run that outgrows the machine fails alone
#        instead of calling the OOM killer; default MemTotal − 2 GB),
#        QUIET_FRAC (0.10) / QUIET_MAX_S (900): before each process, wait until
#        the machine is below that busy fraction over 3 s (others' builds
#        and tests share these 2 cores), at most that long.
# Each result records the wait and the CPU time other processes used while
# it ran (machine busy time from /proc/stat minus the process's own user +
# sys): the summary marks runs where others took more than 0.25 core
# (about 0.1 core is this VM's background when nothing else runs).
# For every model/latent and method: torch, spm (frozen-weight gradients
# skipped, the default), spm with candle's stock backward (skip_frozen=0),
# each in its own process (peak RSS per configuration), one warm-up step
# then N timed steps; medians in the table bench/train_summary.py prints.
set -euo pipefail
cd "$(dirname "$0")/.."
RT="${1:-5}"; RS="${2:-2}"; PY="${3:-python3}"
THREADS="${THREADS:-2}"
OUT="${OUT:-/tmp/train_step.$(date +%Y%m%d-%H%M%S)}"
MODELS="${MODELS:-tiny8 tiny32 sd15}"
METHODS="${METHODS:-spm esd-x fmn}"
MEM_KB=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
SPM_VMEM_KB="${SPM_VMEM_KB:-$((MEM_KB - 2 * 1024 * 1024))}"
QUIET_FRAC="${QUIET_FRAC:-0.10}"; QUIET_MAX_S="${QUIET_MAX_S:-900}"
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"
cargo build --release --example train_bench >/dev/null
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
BIN=target/release/examples/train_bench
RES="$OUT/results.jsonl"
: > "$RES"
echo "results: $RES"
echo "threads $THREADS, runs tiny $RT / sd15 $RS, $(nproc) CPUs, $(uname -r), started $(date -Is)"

# Busy jiffies of the whole machine (user nice system irq softirq steal).
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }

# Wait until the machine is quiet; prints the seconds waited.
wait_quiet() {
    local waited=0 a b
    while :; do
        a=$(busy); sleep 3; b=$(busy)
        if awk -v d=$((b - a)) -v hz="$HZ" -v n="$(nproc)" -v f="$QUIET_FRAC" \
            'BEGIN { exit !(d / (hz * 3 * n) < f) }' || [ "$waited" -ge "$QUIET_MAX_S" ]; then
            break
        fi
        waited=$((waited + 3))
    done
    echo "$waited"
}

# run TAG IMPL MODEL LATENT METHOD CMD...: time it, keep its JSON line plus
# GNU time's wall/user/sys/%M and the load average around it.
run() {
    local tag="$1" impl="$2" model="$3" latent="$4" method="$5"; shift 5
    local l0 l1 rc=0 t0 t1 w b0 b1
    w=$(wait_quiet)
    l0=$(cut -d' ' -f1 /proc/loadavg); t0=$(date +%s); b0=$(busy)
    /usr/bin/time -f '%e %U %S %M' -o "$OUT/$tag.time" "$@" >"$OUT/$tag.json" 2>"$OUT/$tag.err" || rc=$?
    b1=$(busy); l1=$(cut -d' ' -f1 /proc/loadavg); t1=$(date +%s)
    local line
    line=$(grep '^{' "$OUT/$tag.json" | tail -1 || true)
    [ -n "$line" ] || line='{}'
    read -r e u s m < <(grep -E '^[0-9.]+ ' "$OUT/$tag.time" | tail -1 || echo "0 0 0 0")
    "$PY" - "$line" "$tag" "$impl" "$model" "$latent" "$method" "$rc" "$l0" "$l1" "$e" "$u" "$s" "$m" \
        "$w" "$(( b1 - b0 ))" "$HZ" >>"$RES" <<'EOF'
import json, sys
line, tag, impl, model, latent, method, rc, l0, l1, e, u, s, m, w, busy, hz = sys.argv[1:]
others = max(0.0, int(busy) / int(hz) - float(u) - float(s))
d = json.loads(line)
d.update({"tag": tag, "who": impl, "model": model, "latent": int(latent), "method": method,
          "rc": int(rc), "load_before": float(l0), "load_after": float(l1), "quiet_wait_s": int(w),
          "others_cpu_s": round(others, 1), "others_cores": round(others / max(float(e), 1e-9), 2),
          "gnu_time": {"wall_s": float(e), "user_s": float(u), "sys_s": float(s), "max_rss_mb": round(int(m) / 1024)}})
print(json.dumps(d))
EOF
    printf '%-28s rc %-3s %6ss  waited %ss  load %s→%s  %s\n' "$tag" "$rc" "$((t1 - t0))" "$w" "$l0" "$l1" \
        "$(grep -o '"step_s": \[[^]]*\]' "$OUT/$tag.json" || tail -c 300 "$OUT/$tag.err")"
}

for cfg in $MODELS; do
    case "$cfg" in
        tiny8) model=tiny; latent=8; n=$RT ;;
        tiny32) model=tiny; latent=32; n=$RT ;;
        sd15) model=sd15; latent=32; n=$RS ;;
        *) echo "unknown model $cfg"; exit 2 ;;
    esac
    for method in $METHODS; do
        base="$model-$latent-$method"
        run "$base-torch" torch "$model" "$latent" "$method" \
            "$PY" bench/train_torch.py "$model" "$method" "$latent" "$n" "$THREADS"
        for skip in 1 0; do
            run "$base-spm-skip$skip" "spm-skip$skip" "$model" "$latent" "$method" \
                bash -c 'ulimit -v "$0"; exec "$@"' "$SPM_VMEM_KB" \
                "$BIN" "$model" "$method" "$latent" "$skip" "$n"
        done
    done
done
echo "finished $(date -Is)"
"$PY" bench/train_summary.py "$RES"
