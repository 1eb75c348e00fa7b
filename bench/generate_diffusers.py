"""Anchor for `spm generate`: diffusers' StableDiffusionPipeline from the
same LDM single file, same prompt, seed, steps, size, CPU generator,
PNDM. Prints one JSON line (seconds, peak RSS) and saves the image."""
import json, resource, sys, time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

ckpt, cfg, out, steps, size, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
t0 = time.time()
pipe = StableDiffusionPipeline.from_single_file(ckpt, config=cfg, local_files_only=True, torch_dtype=torch.float32,
                                                safety_checker=None, requires_safety_checker=False)
load = time.time() - t0
t1 = time.time()
img = pipe("a photo of a cat", negative_prompt="", num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
           generator=torch.Generator().manual_seed(0), output_type="np").images[0]
gen = time.time() - t1
Image.fromarray((img * 255).round().astype(np.uint8)).save(out)
print(json.dumps({"impl": "diffusers", "load_s": round(load, 1), "generate_s": round(gen, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
