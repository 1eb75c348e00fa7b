"""Markdown tables for bench/extract.sh: wall time and peak RSS (GNU time %M)
per command, ratios to the torch anchor (kohya's full_matrices SVD on the same
tuned format, and --thin), torch's phases, the goals, and run conditions.
Usage: extract_summary.py bench/results/extract-<date>.json"""
import json
import sys

doc = json.load(open(sys.argv[1]))
runs = {r["variant"]: r for r in doc["runs"]}
LABEL = {
    "torch-st": "torch `linalg.svd` (full_matrices, as kohya)", "torch-thin-st": "torch `linalg.svd` (full_matrices=False)",
    "torch-pt": "torch `linalg.svd` (full_matrices, as kohya)", "spm-st": "`spm extract`", "spm-pt": "`spm extract`",
}
FMT = {"safetensors": "`.safetensors`", "pt": "`.pt` (pickle)"}


def ok(r):
    return r is not None and r["rc"] == 0


def wall(r):
    return r["gnu_time"]["wall_s"]


def rss(r):
    return r["gnu_time"]["max_rss_mb"]


def ref_for(r):
    """The kohya-like torch run on the same tuned format (or the .safetensors one)."""
    t = runs.get("torch-pt" if r["tuned_format"] == "pt" else "torch-st")
    return t if ok(t) else (runs.get("torch-st") if ok(runs.get("torch-st")) else None)


def ratio(a, b, bold=False):
    if b is None or not b:
        return "–"
    s = f"{a / b:.2f}×"
    return f"**{s}**" if bold else s


thin = runs.get("torch-thin-st") if ok(runs.get("torch-thin-st")) else None
p = doc["pair"]
print(f"Rank {doc['rank']}, {p['modules']} transformer modules ({p['esd_x_modules']} attn2), "
      f"{doc['threads']} threads, {doc['machine']['cpus']} CPUs ({doc['machine']['cpu']}, {doc['machine']['mem_gb']} GB), "
      f"git {doc['git']['head']}{' (dirty)' if doc['git']['dirty'] else ''}, started {doc['started']}.")
print()
print("| command | tuned input | wall s | vs torch | vs torch thin | peak RSS MB | vs torch |")
print("|---|---|---|---|---|---|---|")
for v, r in runs.items():
    name = LABEL.get(v, v) + (" †" if r.get("others_cores", 0) > 0.25 else "")
    if not ok(r):
        print(f"| {name} | {FMT[r['tuned_format']]} | failed (rc {r['rc']}) | | | {rss(r):,} | |")
        continue
    t = ref_for(r)
    spm = r["who"] == "spm"
    tw = wall(t) if t else None
    tm = rss(t) if t else None
    print(f"| {name} | {FMT[r['tuned_format']]} | {wall(r):.1f} | {ratio(wall(r), tw, spm)} | "
          f"{ratio(wall(r), wall(thin) if thin else None, spm)} | {rss(r):,} | {ratio(rss(r), tm, spm)} |")
print()
print("Ratios are to the torch full_matrices run on the same tuned file (`vs torch`) and to the "
      "full_matrices=False run on the `.safetensors` (`vs torch thin`). "
      "† other processes used more than 0.25 core while it ran.")

torch_runs = [(v, r) for v, r in runs.items() if r["who"] == "torch" and ok(r) and r.get("torch")]
if torch_runs:
    print()
    print("| torch run | load s | ΔW s | SVD s | save s | total s (in-process) | RSS after load MB | ΔW dict MB | kept (min / mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
for v, r in torch_runs:
    d = r["torch"]
    print(f"| {v} | {d['load_s']:.2f} | {d['diff_s']:.2f} | {d['svd_s']:.1f} | {d['save_s']:.2f} | {d['total_s']:.1f} | "
          f"{d['rss_after_load_mb']:,} | {d['diffs_mb']:,} | {d['kept_min']:.4f} / {d['kept_mean']:.4f} |")

spm_runs = [r for r in runs.values() if r["who"] == "spm"]
if spm_runs:
    print()
    print("Goals (≤ 1.0× torch time, peak RSS ≤ 1/4 of torch's):")
    for r in spm_runs:
        t = ref_for(r)
        if not (ok(r) and t):
            print(f"- {r['variant']}: no figures")
            continue
        tq, mq = wall(r) / wall(t), rss(r) / rss(t)
        s = r.get("spm", {})
        print(f"- {r['variant']} ({FMT[r['tuned_format']]}): time {tq:.2f}× — {'met' if tq <= 1.0 else 'NOT met'}; "
              f"RSS {mq:.2f}× — {'met' if mq <= 0.25 else 'NOT met'}; extracted {s.get('extracted')}, "
              f"kept min/mean {s.get('kept_min')} / {s.get('kept_mean')}")

agree = doc.get("agreement") or {}
if agree:
    print()
    print("| output | vs | modules | absent | ‖up·down − ref‖/‖ref‖ median | max |")
    print("|---|---|---|---|---|---|")
    for v, a in agree.items():
        f = lambda x: "–" if x is None else f"{x:.2e}"
        print(f"| {v} | {a['ref']} | {a['modules']} | {a['absent']} | {f(a['rel_err_median'])} | {f(a['rel_err_max'])} |")

print()
print("| tag | rc | wall s | user s | sys s | GNU time %M MB | major faults | waited for quiet s | others' CPU s (cores) | load before → after |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in doc["runs"]:
    g = r["gnu_time"]
    print(f"| {r['tag']} | {r['rc']} | {g['wall_s']:.2f} | {g['user_s']:.1f} | {g['sys_s']:.1f} | {g['max_rss_mb']:,} | "
          f"{g['major_faults']} | {r['quiet_wait_s']} | {r['others_cpu_s']} ({r['others_cores']}) | "
          f"{r['load_before']} → {r['load_after']} |")
