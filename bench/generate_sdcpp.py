"""Third column of the generation benchmark: stable-diffusion.cpp (PyPI
`stable-diffusion-cpp-python`, built from source on this machine) on the
same LDM single file, f32 weights, Euler (its default for SD1), same steps,
size, CFG and thread count. Prints one JSON line."""
import json, resource, sys, time

from stable_diffusion_cpp import StableDiffusion

ckpt, out, steps, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.time()
sd = StableDiffusion(model_path=ckpt, n_threads=threads, wtype="f32", verbose=False)
load = time.time() - t0
t1 = time.time()
img = sd.generate_image(prompt="a photo of a cat", negative_prompt="", width=size, height=size, cfg_scale=7.5,
                        sample_steps=steps, seed=0, sample_method="euler")[0]
gen = time.time() - t1
img.save(out)
print(json.dumps({"impl": "stable-diffusion.cpp (stable-diffusion-cpp-python "
                  + __import__("importlib.metadata").metadata.version("stable-diffusion-cpp-python") + ")",
                  "load_s": round(load, 1), "generate_s": round(gen, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
