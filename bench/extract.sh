#!/usr/bin/env bash
# `spm extract` benchmark: rank-R kohya extraction over the 192 transformer
# modules of an SD1.5-size f32 UNet pair (bench/make_extract_pair.py, random
# weights, every target changed), spm against the torch anchor
# bench/extract_torch.py (kohya's algorithm, torch.linalg.svd), one run.
#
# Usage: bench/extract.sh [PAIR=/tmp/extract-bench]
#   env: SPM_BIN (target/release/spm; this script never builds it),
#        PYTHON (/tmp/oracle/bin/python if present, else python3; needs torch,
#        safetensors, numpy, and diffusers if the pair must be made),
#        RANK (8), THREADS (2),
#        WHO (default "torch-st torch-thin-st torch-pt spm-st spm-pt"):
#          torch-st       torch, full_matrices (kohya), tuned .safetensors
#          torch-thin-st  torch --thin (full_matrices=False), tuned .safetensors
#          torch-pt       torch, full_matrices, tuned .pt (torch.load)
#          spm-st, spm-pt spm extract on the .safetensors / the .pt
#        RES (bench/results/extract-<date>.json), OUT (output LoRAs and logs,
#        default $PAIR/out),
#        QUIET_FRAC (0.10) / QUIET_MAX_S (900): before each process, wait until
#        the machine is below that busy fraction over 3 s, at most that long.
# Each process runs alone under `/usr/bin/time -v` (wall, user, sys, max RSS),
# after the inputs it reads have been pulled into the page cache, and records
# the CPU time other processes used meanwhile (machine busy time from
# /proc/stat minus the process's own user + sys; about 0.1 core is this VM's
# background). Outputs of spm and torch are then compared (reconstruction
# up·down per module). Table: bench/extract_summary.py RES.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR="${1:-/tmp/extract-bench}"
SPM_BIN="${SPM_BIN:-target/release/spm}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x /tmp/oracle/bin/python ]; then PYTHON=/tmp/oracle/bin/python; else PYTHON=python3; fi
fi
PY="$PYTHON"
RANK="${RANK:-8}"; THREADS="${THREADS:-2}"
WHO="${WHO:-torch-st torch-thin-st torch-pt spm-st spm-pt}"
STAMP="$(date +%Y%m%d-%H%M%S)"
RES="${RES:-bench/results/extract-$STAMP.json}"
OUT="${OUT:-$PAIR/out}"
QUIET_FRAC="${QUIET_FRAC:-0.10}"; QUIET_MAX_S="${QUIET_MAX_S:-900}"
HZ=$(getconf CLK_TCK)

if ! /usr/bin/time -v true >/dev/null 2>&1; then
    echo "installing GNU time (Debian package 'time')"
    apt-get install -y time >/dev/null || { apt-get update >/dev/null && apt-get install -y time >/dev/null; }
fi
case " $WHO " in *" spm-"*)
    [ -x "$SPM_BIN" ] || { echo "$SPM_BIN not found: build it (cargo build --release) or set SPM_BIN" >&2; exit 2; } ;;
esac
if [ ! -f "$PAIR/tuned.pt" ] || [ ! -f "$PAIR/pair.json" ]; then
    echo "making the pair in $PAIR"
    HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore "$PY" bench/make_extract_pair.py "$PAIR"
fi
BASE="$PAIR/base"
BASE_FILE="$BASE/diffusion_pytorch_model.safetensors"
mkdir -p "$OUT" "$(dirname "$RES")"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
RUNS="$OUT/runs-$STAMP.jsonl"
: > "$RUNS"
START="$(date -Is)"
echo "results: $RES (runs: $RUNS)"
echo "rank $RANK, threads $THREADS, $(nproc) CPUs, $(uname -r), spm $SPM_BIN, python $PY, started $START"

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

# run TAG WHO TUNED_FORMAT INPUT... -- CMD...: warm INPUTs, wait for quiet,
# time CMD, append one JSON object to $RUNS.
run() {
    local tag="$1" who="$2" fmt="$3"; shift 3
    local inputs=()
    while [ "$1" != "--" ]; do inputs+=("$1"); shift; done
    shift
    cat "${inputs[@]}" > /dev/null # same warm page cache for everyone
    local w l0 l1 b0 b1 rc=0
    w=$(wait_quiet)
    l0=$(cut -d' ' -f1 /proc/loadavg); b0=$(busy)
    /usr/bin/time -v -o "$OUT/$tag.time" "$@" >"$OUT/$tag.json" 2>"$OUT/$tag.err" || rc=$?
    b1=$(busy); l1=$(cut -d' ' -f1 /proc/loadavg)
    "$PY" - "$OUT/$tag.json" "$OUT/$tag.time" "$tag" "$who" "$fmt" "$rc" "$l0" "$l1" "$w" \
        "$(( b1 - b0 ))" "$HZ" "$*" >>"$RUNS" <<'EOF'
import json, sys
out, tfile, tag, who, fmt, rc, l0, l1, w, busy, hz, cmd = sys.argv[1:]
g = {}
for line in open(tfile):
    k, _, v = line.strip().rpartition(": ")
    g[k] = v
def wall(s):  # h:mm:ss or m:ss.ss
    s = [float(x) for x in s.split(":")]
    return sum(x * 60 ** i for i, x in enumerate(reversed(s)))
e = wall(g.get("Elapsed (wall clock) time (h:mm:ss or m:ss)", "0"))
u, s = float(g.get("User time (seconds)", 0)), float(g.get("System time (seconds)", 0))
m = int(g.get("Maximum resident set size (kbytes)", 0))
text = open(out).read()
d = {}
try:
    d = json.loads(text)
except ValueError:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                d = json.loads(line); break
            except ValueError:
                pass
r = {"tag": tag, "who": who.split("-")[0], "variant": who, "tuned_format": fmt, "rc": int(rc), "cmd": cmd}
if who.startswith("spm"):  # its summary; the whole report stays in $OUT/<tag>.json
    mods = d.get("modules") or []
    r["spm"] = {k: d.get(k) for k in ("extracted", "skipped_zero", "absent", "selected", "rule", "base_check") if k in d}
    kept = [x["kept"] for x in mods if "kept" in x]
    if kept:
        r["spm"].update(kept_min=round(min(kept), 4), kept_mean=round(sum(kept) / len(kept), 4))
    r["spm"]["dropped"] = len(d.get("dropped") or [])
    r["spm"].update({k: v for k, v in d.items() if k.endswith("_s") or k.startswith("time")})
else:
    r["torch"] = d
others = max(0.0, int(busy) / int(hz) - u - s)
r.update({"load_before": float(l0), "load_after": float(l1), "quiet_wait_s": int(w),
          "others_cpu_s": round(others, 1), "others_cores": round(others / max(e, 1e-9), 2),
          "gnu_time": {"wall_s": e, "user_s": u, "sys_s": s, "max_rss_mb": round(m / 1024),
                       "major_faults": int(g.get("Major (requiring I/O) page faults", 0)),
                       "exit_status": int(g.get("Exit status", -1))}})
print(json.dumps(r))
print(f"{tag:<14} rc {rc:<3} {e:8.2f} s  max RSS {m / 1024:7.0f} MB  waited {w} s  "
      f"others {r['others_cores']} cores  load {l0}->{l1}", file=sys.stderr)
EOF
    [ "$rc" = 0 ] || tail -c 600 "$OUT/$tag.err"
}

TORCH=("$PY" bench/extract_torch.py --base "$BASE" --rank "$RANK" --threads "$THREADS")
SPM=("$SPM_BIN" extract --base "$BASE" --rank "$RANK" --modules transformer --json --force)
for who in $WHO; do
    case "$who" in
        torch-st) run "$who" "$who" safetensors "$BASE_FILE" "$PAIR/tuned.safetensors" -- \
            "${TORCH[@]}" --tuned "$PAIR/tuned.safetensors" -o "$OUT/$who.safetensors" --report "$OUT/$who.report.json" ;;
        torch-thin-st) run "$who" "$who" safetensors "$BASE_FILE" "$PAIR/tuned.safetensors" -- \
            "${TORCH[@]}" --thin --tuned "$PAIR/tuned.safetensors" -o "$OUT/$who.safetensors" --report "$OUT/$who.report.json" ;;
        torch-pt) run "$who" "$who" pt "$BASE_FILE" "$PAIR/tuned.pt" -- \
            "${TORCH[@]}" --tuned "$PAIR/tuned.pt" -o "$OUT/$who.safetensors" --report "$OUT/$who.report.json" ;;
        spm-st) run "$who" "$who" safetensors "$BASE_FILE" "$PAIR/tuned.safetensors" -- \
            "${SPM[@]}" --tuned "$PAIR/tuned.safetensors" -o "$OUT/$who.safetensors" ;;
        spm-pt) run "$who" "$who" pt "$BASE_FILE" "$PAIR/tuned.pt" -- \
            "${SPM[@]}" --tuned "$PAIR/tuned.pt" -o "$OUT/$who.safetensors" ;;
        *) echo "unknown WHO entry $who" >&2; exit 2 ;;
    esac
done

# Agreement of every output with the first torch one: per module,
# ||up·down − up_ref·down_ref||_F / ||up_ref·down_ref||_F (SVD signs cancel).
"$PY" - "$OUT" $WHO > "$OUT/agreement-$STAMP.json" <<'EOF'
import json, os, sys
import numpy as np
from safetensors.numpy import load_file
out, who = sys.argv[1], sys.argv[2:]
have = [w for w in who if os.path.exists(f"{out}/{w}.safetensors")]
refs = [w for w in have if w.startswith("torch")]
res = {}
if refs:
    ref = load_file(f"{out}/{refs[0]}.safetensors")
    names = sorted(k[: -len(".lora_up.weight")] for k in ref if k.endswith(".lora_up.weight"))
    def prod(sd, n):
        up = sd[f"{n}.lora_up.weight"].astype(np.float64)
        down = sd[f"{n}.lora_down.weight"].astype(np.float64)
        r = down.shape[0]
        scale = float(sd[f"{n}.alpha"]) / r if f"{n}.alpha" in sd else 1.0
        return up.reshape(up.shape[0], r) @ down.reshape(r, -1) * scale
    for w in have:
        if w == refs[0]:
            continue
        sd = load_file(f"{out}/{w}.safetensors")
        errs, absent = [], 0
        for n in names:
            if f"{n}.lora_up.weight" not in sd:
                absent += 1
                continue
            a, b = prod(sd, n), prod(ref, n)
            errs.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
        res[w] = {"ref": refs[0], "modules": len(errs), "absent": absent,
                  "rel_err_max": max(errs) if errs else None,
                  "rel_err_median": float(np.median(errs)) if errs else None,
                  "extra_keys": len(set(sd) - set(ref))}
print(json.dumps(res))
EOF

"$PY" - "$RUNS" "$RES" "$PAIR" "$START" "$OUT/agreement-$STAMP.json" "$RANK" "$THREADS" "$SPM_BIN" <<'EOF'
import datetime, json, os, platform, subprocess, sys
runs, res, pair, start, agree, rank, threads, spm = sys.argv[1:]
p = json.load(open(f"{pair}/pair.json"))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
def git(*a):
    try:
        return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
doc = {
    "bench": "extract", "started": start, "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "rank": int(rank), "threads": int(threads), "modules": "transformer",
    "machine": {"cpus": os.cpu_count(), "cpu": cpu, "mem_gb": round(mem / 2**20, 1), "kernel": platform.release()},
    "git": {"head": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
    "spm_bin": spm, "spm_version": None,
    "pair": {k: p[k] for k in ("outdir", "params", "tensors", "modules", "esd_x_modules", "delta_rank",
                               "delta_rel", "noise_rel", "files", "phases")},
    "runs": [json.loads(l) for l in open(runs) if l.strip()],
    "agreement": json.load(open(agree)) if os.path.getsize(agree) else {},
}
if os.access(spm, os.X_OK):
    try:
        doc["spm_version"] = subprocess.run([spm, "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
json.dump(doc, open(res, "w"), indent=1)
print("wrote", res)
EOF
"$PY" bench/extract_summary.py "$RES"
