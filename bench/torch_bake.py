"""The anchor for `spm bake`: the usual torch + safetensors merge script.
Loads the whole checkpoint, adds (alpha/r)·up@down to each target in f32,
casts back to the checkpoint dtype and saves.

Usage: python bench/torch_bake.py BASE.safetensors SPM.safetensors OUT.safetensors
"""
import sys

import torch
from safetensors.torch import load_file, save_file


def main(base, spm, out):
    sd = load_file(base)
    lora = load_file(spm)
    names = {k.split(".", 1)[0] for k in lora}
    index = {k[: -len(".weight")].replace(".", "_"): k for k in sd if k.endswith(".weight")}
    for name in names:
        down = lora[f"{name}.lora_down.weight"].float()
        up = lora[f"{name}.lora_up.weight"].float()
        alpha = lora[f"{name}.alpha"].item() if f"{name}.alpha" in lora else down.shape[0]
        key = index[name[len("lora_unet_"):]]
        w = sd[key]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / down.shape[0])
        sd[key] = (w.float() + delta).to(w.dtype)
    save_file(sd, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
