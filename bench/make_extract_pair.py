"""Build the `spm extract` benchmark inputs: an SD1.5-size UNet pair with
random weights, made from the SD1.5 UNet *config* (written out below; nothing
is downloaded).

  OUTDIR/base/config.json, OUTDIR/base/diffusion_pytorch_model.safetensors
      the base, a diffusers UNet folder, f32 (3,438,083,856 bytes of tensors)
  OUTDIR/tuned.safetensors   the tuned UNet, all 686 tensors, diffusers keys, f32
  OUTDIR/tuned.pt            the same state dict through torch.save (pickle path)
  OUTDIR/pair.json           what was changed, per module, and how long it took

The tuned UNet is the base with, on every one of the 192 kohya transformer
modules (attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2,
proj_in, proj_out of the 16 Transformer2DModels), W += D + N where
  D: a random rank-16 matrix (singular values decaying as 0.85^i) scaled to
     ||D||_F = 1e-2 * ||W||_F,
  N: full-rank Gaussian noise scaled to ||N||_F = 1e-4 * ||W||_F.
attn2 modules are the ESD-x-like part, the other 128 the ESD-u-like part;
every target therefore has a nonzero delta (the worst case for extraction).
Biases, norms and all other tensors are left equal to the base.

Deterministic: torch.manual_seed(0) for the UNet init, a Generator seeded 1
for the deltas. Memory: one f32 UNet (~3.4 GB) plus one module's scratch; the
weights are updated in place after the base has been written.

Usage: python bench/make_extract_pair.py [OUTDIR]   (default /tmp/extract-bench)
"""
import json
import os
import re
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

# Stable Diffusion 1.5's unet/config.json (runwayml/stable-diffusion-v1-5),
# written out here so that nothing is fetched.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8,
)

# The 192 kohya SD1 UNet targets, by diffusers tensor name (the same pattern
# bench/extract_torch.py uses; checked against the module walk below).
TARGET = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$"
)
DELTA_RANK = 16
DELTA_REL = 1e-2
NOISE_REL = 1e-4


def targets(unet):
    """(path, module) of every Linear/Conv2d inside a Transformer2DModel, in module order."""
    out = []
    for path, mod in unet.named_modules():
        if type(mod).__name__ != "Transformer2DModel":
            continue
        for child, layer in mod.named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                out.append((f"{path}.{child}", layer))
    return out


def delta_for(w, g):
    """D + N for weight w (any rank-2 or rank-4 shape), f32."""
    out = w.shape[0]
    flat = w.numel() // out
    a = torch.randn(out, DELTA_RANK, generator=g)
    a *= 0.85 ** torch.arange(DELTA_RANK, dtype=torch.float32)
    b = torch.randn(DELTA_RANK, flat, generator=g)
    d = a @ b
    wn = w.norm().item()
    d *= DELTA_REL * wn / d.norm().item()
    n = torch.randn(out, flat, generator=g)
    n *= NOISE_REL * wn / n.norm().item()
    d += n
    return d.reshape(w.shape)


def df_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def main(outdir):
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t_start = time.perf_counter()
    os.makedirs(f"{outdir}/base", exist_ok=True)
    free_before = df_bytes(outdir)
    need = 3 * 3_438_083_856 + (1 << 30)
    if free_before < need:
        sys.exit(f"{outdir}: {free_before / 1e9:.1f} GB free, need ~{need / 1e9:.1f} GB")
    phases = {}

    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel(**SD15_UNET)  # CPU, f32, diffusers' default init
    unet.requires_grad_(False)
    phases["init_s"] = time.perf_counter() - t

    mods = targets(unet)
    assert len(mods) == 192, len(mods)
    sd = unet.state_dict()
    assert len(sd) == 686, len(sd)
    n_params = sum(v.numel() for v in sd.values())
    assert n_params == 859_520_964, n_params
    by_regex = sorted(k for k in sd if TARGET.match(k))
    assert by_regex == sorted(f"{p}.weight" for p, _ in mods), "target regex disagrees with the module walk"

    t = time.perf_counter()
    unet.save_config(f"{outdir}/base")  # config.json, as save_pretrained writes it
    save_file(sd, f"{outdir}/base/diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    phases["write_base_s"] = time.perf_counter() - t

    t = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    info = []
    with torch.no_grad():
        for path, layer in mods:
            w = layer.weight
            before = w.clone()
            w += delta_for(w, g)
            dw = w - before  # the delta as stored (after f32 rounding)
            kind = "linear" if w.dim() == 2 else ("conv1x1" if w.shape[2:] == (1, 1) else "conv3x3")
            info.append({"path": path, "kind": kind, "shape": list(w.shape),
                         "part": "esd-x" if ".attn2." in path else "esd-u",
                         "w_fro": before.norm().item(), "delta_fro": dw.norm().item(),
                         "delta_max_abs": dw.abs().max().item()})
            del before, dw
    assert all(m["delta_max_abs"] > 0 for m in info)
    phases["deltas_s"] = time.perf_counter() - t

    t = time.perf_counter()
    save_file(sd, f"{outdir}/tuned.safetensors", metadata={"format": "pt"})
    phases["write_tuned_safetensors_s"] = time.perf_counter() - t
    t = time.perf_counter()
    torch.save(sd, f"{outdir}/tuned.pt")
    phases["write_tuned_pt_s"] = time.perf_counter() - t

    t = time.perf_counter()
    os.sync()
    phases["sync_s"] = time.perf_counter() - t
    phases["total_s"] = time.perf_counter() - t_start
    files = {rel: os.path.getsize(f"{outdir}/{rel}") for rel in
             ("base/config.json", "base/diffusion_pytorch_model.safetensors", "tuned.safetensors", "tuned.pt")}
    summary = {
        "outdir": os.path.abspath(outdir), "config": SD15_UNET, "params": n_params, "tensors": len(sd),
        "seed_init": 0, "seed_delta": 1, "delta_rank": DELTA_RANK, "delta_rel": DELTA_REL, "noise_rel": NOISE_REL,
        "modules": len(info), "esd_x_modules": sum(m["part"] == "esd-x" for m in info),
        "phases": {k: round(v, 2) for k, v in phases.items()}, "files": files,
        "bytes_written": sum(files.values()), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "per_module": info,
    }
    with open(f"{outdir}/pair.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("per_module", "config")}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/extract-bench")
