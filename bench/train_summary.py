"""Tables for bench/train_step.sh: median step seconds (forward / backward /
optimizer), ratio to torch, peak RSS (VmHWM), ratio; then frozen-weight
gradients skipped vs computed. Usage: train_summary.py results.jsonl"""
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda v: statistics.median(v) if v else float("nan")
key = lambda r: (r["model"], r["latent"], r["method"])
order = []
for r in rows:
    if key(r) not in order:
        order.append(key(r))
by = {(key(r), r["who"]): r for r in rows}
label = {"torch": "torch", "spm-skip1": "spm", "spm-skip0": "spm, stock backward"}


def fmt(x, d=3):
    return "–" if x != x else f"{x:.{d}f}"


def ok(r):
    return r and r.get("rc") == 0 and r.get("step_s")


print("| model | latent | method | impl | median step s (fwd / bwd / opt) | runs (s) | vs torch | peak RSS MB | vs torch |")
print("|---|---|---|---|---|---|---|---|---|")
for k in order:
    t = by.get((k, "torch"))
    ts = med(t["step_s"]) if ok(t) else float("nan")
    tm = t["peak_rss_mb"] if ok(t) else float("nan")
    for who in ("torch", "spm-skip1", "spm-skip0"):
        r = by.get((k, who))
        if r is None:
            continue
        name = label[who]
        if not ok(r):
            print(f"| {k[0]} | {k[1]} | {k[2]} | {name} | failed (rc {r.get('rc')}, GNU time max RSS {r['gnu_time']['max_rss_mb']} MB) | | | | |")
            continue
        s = med(r["step_s"])
        parts = " / ".join(fmt(med(r[p])) for p in ("forward_s", "backward_s", "optim_s"))
        runs = ", ".join(fmt(x, 2) for x in r["step_s"])
        m = r["peak_rss_mb"]
        bold = lambda x: f"**{x}**" if who == "spm-skip1" else x
        mark = " †" if r.get("others_cores", 0) > 0.25 else ""
        print(f"| {k[0]} | {k[1]} | {k[2]} | {name}{mark} | {fmt(s)} ({parts}) | {runs} | "
              f"{bold(fmt(s / ts, 2) + '×')} | {m:,.0f} | {bold(fmt(m / tm, 2) + '×')} |")

print()
print("† other processes used more than 0.25 core while this one ran (see others' CPU below).")
print()
print("| model | latent | method | step s skipped → computed | ratio | backward s skipped → computed | peak RSS MB skipped → computed | ratio |")
print("|---|---|---|---|---|---|---|---|")
for k in order:
    a, b = by.get((k, "spm-skip1")), by.get((k, "spm-skip0"))
    if not (ok(a) and ok(b)):
        continue
    sa, sb = med(a["step_s"]), med(b["step_s"])
    ba, bb = med(a["backward_s"]), med(b["backward_s"])
    ma, mb = a["peak_rss_mb"], b["peak_rss_mb"]
    print(f"| {k[0]} | {k[1]} | {k[2]} | {fmt(sa)} → {fmt(sb)} | {fmt(sb / sa, 2)}× | {fmt(ba)} → {fmt(bb)} | "
          f"{ma:,.0f} → {mb:,.0f} | {fmt(mb / ma, 2)}× |")

print()
print("| tag | rc | build s | warm-up s | RSS after build MB | VmHWM MB | GNU time %M MB | wall s | user s | sys s | waited for quiet s | others' CPU s (cores) | load before → after | loss (first timed) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    g = r["gnu_time"]
    loss = r.get("loss") or [float("nan")]
    print(f"| {r['tag']} | {r['rc']} | {r.get('build_s', '–')} | {r.get('warmup_s', '–')} | {r.get('rss_after_build_mb', '–')} | "
          f"{r.get('peak_rss_mb', '–')} | {g['max_rss_mb']} | {g['wall_s']} | {g['user_s']} | {g['sys_s']} | {r.get('quiet_wait_s', '–')} | "
          f"{r.get('others_cpu_s', '–')} ({r.get('others_cores', '–')}) | "
          f"{r['load_before']} → {r['load_after']} | {loss[0]:.4g} |")
