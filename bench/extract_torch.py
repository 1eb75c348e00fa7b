"""The anchor for `spm extract`: a torch script doing what kohya-ss/sd-scripts'
networks/extract_lora_from_models.py does for an SD1 UNet
(/work/shared/spec/trainer-methods.md §4.1), on diffusers-key inputs.

  1. load both state dicts whole, as a user would: safetensors.torch.load_file,
     or torch.load for .pt/.ckpt/.bin;
  2. for the 192 kohya transformer targets (attn1/attn2 to_q/to_k/to_v/to_out.0,
     ff.net.0.proj, ff.net.2, proj_in, proj_out of every Transformer2DModel,
     picked from the tensor names), ΔW = f32(tuned) − f32(base), all of them
     first, as kohya does;
  3. per module: conv flattened (1x1 squeezed), torch.linalg.svd(ΔW)
     (full_matrices=True like kohya; --thin for full_matrices=False),
     up = U[:, :r]·diag(S[:r]), down = Vh[:r], r = min(rank, out, in);
     conv factors reshaped to [out, r, 1, 1] / [r, in, kh, kw];
     kohya's signed-quantile clamp only with --clamp-quantile (kohya's default
     is 0.99; spm's is off, so the benchmark runs without it);
  4. save `lora_unet_<path, . → _>.{lora_up.weight,lora_down.weight,alpha}`
     (alpha = r, F32) with kohya's minimal ss_* metadata.

Prints one JSON line: wall seconds per phase (load, diff, svd, save, total),
peak RSS (getrusage ru_maxrss), and summary figures. --report FILE writes the
per-module figures (delta_fro, kept, residual, as in spm's --json report).

Usage: python bench/extract_torch.py --base DIR --tuned FILE --rank 8 -o OUT.safetensors [--thin]
"""
import argparse
import json
import os
import re
import resource
import time

import torch
from safetensors.torch import load_file, save_file

TARGET = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$"
)


def unet_file(path):
    """A diffusers UNet folder, a pipeline folder, or a file."""
    if os.path.isdir(path):
        for d in (path, os.path.join(path, "unet")):
            for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
                if os.path.isfile(os.path.join(d, name)):
                    return os.path.join(d, name)
        raise SystemExit(f"{path}: no diffusion_pytorch_model.safetensors/.bin")
    return path


def load(path):
    if path.endswith(".safetensors"):
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu")
        sd = sd.get("state_dict", sd)
    return {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in sd.items()}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--tuned", required=True)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--thin", action="store_true", help="torch.linalg.svd(full_matrices=False)")
    ap.add_argument("--clamp-quantile", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", help="write per-module figures (JSON) here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ph = {}
    t0 = t = time.perf_counter()

    base = load(unet_file(a.base))
    tuned = load(unet_file(a.tuned))
    ph["load_s"] = time.perf_counter() - t
    rss_loaded = peak_rss_mb()

    t = time.perf_counter()
    keys = sorted(k for k in base if TARGET.match(k))
    missing = [k for k in keys if k not in tuned]
    if missing:
        raise SystemExit(f"{a.tuned}: no {missing[0]} (and {len(missing) - 1} more)")
    diffs = {}
    with torch.no_grad():
        for k in keys:
            if tuned[k].shape != base[k].shape:
                raise SystemExit(f"{k}: shape {tuple(tuned[k].shape)} in tuned, {tuple(base[k].shape)} in base")
            diffs[k[: -len(".weight")]] = (tuned[k] - base[k]).float()
    ph["diff_s"] = time.perf_counter() - t
    diff_mb = sum(d.numel() * 4 for d in diffs.values()) / 2**20

    t = time.perf_counter()
    lora, report = {}, []
    with torch.no_grad():
        for path, mat in diffs.items():
            shape = mat.shape
            conv = mat.dim() == 4
            kind = "linear" if not conv else ("conv1x1" if tuple(shape[2:]) == (1, 1) else "conv3x3")
            out_dim, in_dim = shape[0], shape[1]
            m = mat.reshape(out_dim, -1)
            r = min(a.rank, out_dim, in_dim)
            ts = time.perf_counter()
            U, S, Vh = torch.linalg.svd(m, full_matrices=not a.thin)
            up = U[:, :r] * S[:r]
            down = Vh[:r].clone()  # not a view: it would keep the whole Vh alive
            del U, Vh
            fro = S.norm().item()
            if a.clamp_quantile is not None:
                hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), a.clamp_quantile)
                up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
                rec = (up @ down).norm().item()
                res = (m - up @ down).norm().item()
            else:  # exact for an orthogonal projection, and free
                rec, res = S[:r].norm().item(), S[r:].norm().item()
            report.append({"path": path, "kind": kind, "rank": r, "max_rank": min(out_dim, m.shape[1]),
                           "delta_fro": fro, "kept": rec / fro if fro else 0.0,
                           "residual": res / fro if fro else 0.0,
                           "svd_s": round(time.perf_counter() - ts, 4)})
            if conv:
                up = up.reshape(out_dim, r, 1, 1)
                down = down.reshape(r, in_dim, *shape[2:])
            name = "lora_unet_" + path.replace(".", "_")
            lora[f"{name}.lora_up.weight"] = up.contiguous()
            lora[f"{name}.lora_down.weight"] = down.contiguous()
            lora[f"{name}.alpha"] = torch.tensor(float(r), dtype=torch.float32)
            del mat, m
    ph["svd_s"] = time.perf_counter() - t

    t = time.perf_counter()
    meta = {"ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
            "ss_network_dim": str(a.rank), "ss_network_alpha": str(float(a.rank)), "ss_network_args": "{}"}
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    save_file(lora, a.output, metadata=meta)
    ph["save_s"] = time.perf_counter() - t
    ph["total_s"] = time.perf_counter() - t0

    kept = [m["kept"] for m in report]
    line = {"who": "torch", "svd": "thin" if a.thin else "full_matrices", "rank": a.rank,
            "clamp_quantile": a.clamp_quantile, "threads": torch.get_num_threads(),
            "modules": len(report), "output_bytes": os.path.getsize(a.output),
            **{k: round(v, 3) for k, v in ph.items()},
            "peak_rss_mb": round(peak_rss_mb()), "rss_after_load_mb": round(rss_loaded),
            "diffs_mb": round(diff_mb), "kept_min": round(min(kept), 4),
            "kept_mean": round(sum(kept) / len(kept), 4), "torch": torch.__version__}
    if a.report:
        with open(a.report, "w") as f:
            json.dump({"summary": line, "modules": report}, f, indent=1)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
