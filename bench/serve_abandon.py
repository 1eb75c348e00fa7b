"""Abandoned work in `spm serve`: what a timed-out request costs the next one.

For each binary given (the anchor first, e.g. the previous release, then
this one), start `spm serve` on loopback with the bundled tiny SD1 text
encoder and a 1 s timeout, then:

1. send one request with N distinct AND sub-prompts (about 60 KB) that
   cannot finish in time -> expect 504;
2. right after the 504, time a one-prompt request (new prompt, so it is
   really computed);
3. read the daemon's CPU time from /proc over the next 5 s: work that
   outlives its request shows up here.

Stdlib only (urllib is also the client that used to see "broken pipe" on a
413). Linux only (/proc). Usage:

    python3 bench/serve_abandon.py OLD_SPM NEW_SPM [parts]
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "fixtures", "data", "sd1")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def post(addr, body, timeout=120):
    req = urllib.request.Request(
        f"http://{addr}/v1/gate", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status = r.status
            r.read()
    except urllib.error.HTTPError as e:
        status = e.code
        e.read()
    return status, time.perf_counter() - t


def oversize(addr, n):
    """What urllib (which sends the whole body before reading) sees for an
    n-byte body against the 2 MB limit set here."""
    body = json.dumps({"prompts": ["a" * n]}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/gate", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return str(r.status)
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except Exception as e:  # noqa: BLE001 - the point is which error
        return f"{type(e).__name__}: {getattr(e, 'reason', e)}"


def run(binary, parts):
    mem = tempfile.mkdtemp()
    os.symlink(os.path.join(FIX, "spm.safetensors"), os.path.join(mem, "pikachu.safetensors"))
    args = [binary, "serve", "--port", "0", "--membranes", mem, "--text-encoder",
            os.path.join(FIX, "base"), "--timeout-ms", "1000", "--max-body-bytes", "2000000",
            "--concurrency", "1"]
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout
    if "--max-subprompts" in help_text:  # this version caps sub-prompts: lift the caps
        args += ["--max-subprompts", "1000000", "--max-tokens", "100000000"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    addr = line.split("http://")[1].split()[0]
    heavy = {"prompts": [" AND ".join(f"w{i}" for i in range(parts))]}
    s1, t1 = post(addr, heavy)
    c0 = cpu_seconds(p.pid)
    s2, t2 = post(addr, {"prompts": ["a photo of a lighthouse at dusk"]})
    time.sleep(max(0.0, 5.0 - t2))
    c1 = cpu_seconds(p.pid)
    sizes = {f"{n // 1000} KB body": oversize(addr, n) for n in (100_000, 3_000_000, 6_000_000)}
    p.terminate()
    p.wait()
    return {"binary": binary, "heavy_status": s1, "heavy_s": round(t1, 2),
            "next_status": s2, "next_ms": round(t2 * 1000, 1),
            "cpu_after_504_s": round(c1 - c0, 2), **sizes}


def main():
    bins = sys.argv[1:3]
    parts = int(sys.argv[3]) if len(sys.argv) > 3 else 6000
    rows = [run(b, parts) for b in bins]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
