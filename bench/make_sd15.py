"""Build the bake benchmark inputs: an SD1.5-size UNet (random fp16 weights,
diffusers layout, ~1.7 GB) and a full-size SD1 SPM (192 rank-1 modules, F32).

Everything is made from the SD1.5 UNet *config* on the meta device; nothing
is downloaded. Usage: python bench/make_sd15.py bench/work
"""
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


def write_ldm(out):
    """The same UNet as a single-file LDM checkpoint (`model.diffusion_model.<SAI>`),
    renamed with the fixture generator's spec-table renamer (checked there
    against diffusers' own LDM converter)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "fixtures"))
    from make_fixtures import make_sai_renamer, unet_to_ldm
    from safetensors.torch import load_file

    sd = load_file(f"{out}/sd15/unet/diffusion_pytorch_model.safetensors")
    ldm = unet_to_ldm(sd, make_sai_renamer(dict(SD15)))
    save_file(ldm, f"{out}/sd15_ldm.safetensors")


def main(out):
    if os.path.exists(f"{out}/sd15/unet/diffusion_pytorch_model.safetensors"):
        if not os.path.exists(f"{out}/sd15_ldm.safetensors"):
            write_ldm(out)
        return
    os.makedirs(f"{out}/sd15/unet", exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in unet.state_dict().items():
        sd[k] = (torch.randn(v.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.float16)
    save_file(sd, f"{out}/sd15/unet/diffusion_pytorch_model.safetensors")
    with open(f"{out}/sd15/unet/config.json", "w") as f:
        json.dump(dict(SD15, _class_name="UNet2DConditionModel"), f)
    spm = {}
    for path, mod in unet.named_modules():
        if type(mod).__name__ != "Transformer2DModel":
            continue
        for child, layer in mod.named_modules():
            kind = type(layer).__name__
            if kind not in ("Linear", "Conv2d"):
                continue
            name = f"lora_unet.{path}.{child}".replace(".", "_")
            if kind == "Linear":
                down, up = (1, layer.in_features), (layer.out_features, 1)
            else:
                down = (1, layer.in_channels, *layer.kernel_size)
                up = (layer.out_channels, 1, 1, 1)
            spm[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.1
            spm[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.1
            spm[f"{name}.alpha"] = torch.tensor(1.0)
    assert len(spm) == 576, len(spm)
    save_file(spm, f"{out}/spm_sd15.safetensors", metadata={"prompts": "pikachu", "rank": "1", "alpha": "1.0"})
    write_ldm(out)
    print(f"wrote {out}/sd15 ({sum(t.numel() for t in sd.values())} params) and {out}/spm_sd15.safetensors")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/work")
