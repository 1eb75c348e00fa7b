"""The anchor for bench/unet_bench.rs: diffusers' UNet2DConditionModel with
SD1.5's (or, with `sdxl` as the 4th argument, SDXL 1.0 base's) config and
random weights, latent 64x64, batch 2, f32, under torch.no_grad, on the same
number of threads. Prints one JSON line."""
import json, resource, sys, time

import torch
from diffusers import UNet2DConditionModel

latent = int(sys.argv[1]) if len(sys.argv) > 1 else 64
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
xl = len(sys.argv) > 4 and sys.argv[4] == "sdxl"
torch.set_num_threads(threads)
t0 = time.time()
if xl:
    unet = UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, sample_size=128).eval()
else:
    unet = UNet2DConditionModel(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
        cross_attention_dim=768, sample_size=64).eval()
build = time.time() - t0
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, latent, latent, generator=g)
ctx = torch.randn(2, 77, 2048 if xl else 768, generator=g)
t = torch.tensor([500.0, 500.0])
added = ({"text_embeds": torch.randn(2, 1280, generator=g),
          "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)} if xl else None)
times = []
with torch.no_grad():
    for _ in range(runs):
        s = time.time()
        y = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        float(y.sum())
        times.append(round(time.time() - s, 3))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"impl": f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__}",
                  "arch": "sdxl" if xl else "sd15", "latent": latent, "build_s": round(build, 2), "forward_s": times,
                  "peak_rss_mb": round(rss), "threads": threads,
                  "attention": type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__}))
