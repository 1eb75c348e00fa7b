#!/usr/bin/env python3
"""The torch anchor for the FT sidecar's per-prompt cost: tokenise + encode one new prompt
with a CLIP-L-sized text encoder (SD1's), batch 1, 77 tokens, fp32, CPU, 2 threads.

  HF_HUB_OFFLINE=1 oracle-venv/bin/python bench/torch_clip_latency.py bench/work/clip_l/text_encoder \
      [--wheel /tmp/ocw/open_clip_torch-3.3.0-py3-none-any.whl] [--runs 50] [--warmup 5] [--threads 2]

* If DIR has no model.safetensors, a random CLIPTextModel (hidden 768, 12 layers, 12 heads,
  intermediate 3072, vocab 49408, 77 positions, quick_gelu; torch.manual_seed(0)) is built
  from its config and saved there in diffusers layout (DIR/config.json + DIR/model.safetensors,
  fp32, ~492 MB). The tokenizer (vocab.json/merges.txt built from open_clip's
  bpe_simple_vocab_16e6.txt.gz, see shared/spec/oracles.md 7.1) goes to DIR/../tokenizer.
* The model is then loaded back with from_pretrained (timed) and, after --warmup runs, each
  run tokenises a prompt never seen before (padding max_length 77, truncation) and runs the
  encoder under torch.inference_mode. Prints one JSON object with median / p90 / min / max
  in milliseconds for tokenise, encode and tokenise+encode.
"""
import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from clip_bpe import bytes_to_unicode  # noqa: E402

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
              bos_token_id=49406, eos_token_id=49407, pad_token_id=1, layer_norm_eps=1e-5)

ADJ = ["red", "tiny", "ancient", "glowing", "wooden", "furry", "metallic", "sleepy", "giant", "paper"]
NOUN = ["fox", "castle", "robot", "teapot", "dragon", "lighthouse", "bicycle", "owl", "cactus", "ship"]
PLACE = ["in a forest", "on the moon", "under the sea", "in tokyo at night", "on a snowy mountain"]


def prompt(i):
    return (f"a {ADJ[i % 10]} {NOUN[(i // 10) % 10]} {PLACE[i % 5]}, photo number {i}, "
            f"highly detailed, {ADJ[(i * 7) % 10]} light, by artist {i * 31 % 97}")



def write_tokenizer(wheel, out):
    with zipfile.ZipFile(wheel) as z:
        lines = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    syms = bytes_to_unicode()
    vocab = syms + [s + "</w>" for s in syms] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=os.path.join(out, "vocab.json"), merges=os.path.join(out, "merges.txt"),
                        model_max_length=77)
    tok.save_pretrained(out)


def stats(xs):
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return {"median_ms": round(statistics.median(xs) * 1e3, 3), "p90_ms": round(p90 * 1e3, 3),
            "min_ms": round(xs[0] * 1e3, 3), "max_ms": round(xs[-1] * 1e3, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", help="text_encoder folder (created if it has no model.safetensors)")
    ap.add_argument("--wheel", default="/tmp/ocw/open_clip_torch-3.3.0-py3-none-any.whl")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(a.dir)), "tokenizer")
    built = False
    if not os.path.exists(os.path.join(a.dir, "model.safetensors")):
        torch.manual_seed(0)
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
        model.save_pretrained(a.dir)
        del model
        built = True
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        write_tokenizer(a.wheel, tok_dir)
    t0 = time.perf_counter()
    model = CLIPTextModel.from_pretrained(a.dir, torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    t_tok, t_enc, t_all = [], [], []
    with torch.inference_mode():
        for i in range(a.warmup + a.runs):
            p = prompt(i)
            t0 = time.perf_counter()
            ids = tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            t1 = time.perf_counter()
            h = model(input_ids=ids)[0]
            t2 = time.perf_counter()
            assert h.shape == (1, 77, 768)
            if i >= a.warmup:
                t_tok.append(t1 - t0)
                t_enc.append(t2 - t1)
                t_all.append(t2 - t0)
    size = os.path.getsize(os.path.join(a.dir, "model.safetensors"))
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    print(json.dumps({
        "model_dir": a.dir, "built_now": built, "model_bytes": size,
        "params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(), "runs": a.runs, "warmup": a.warmup,
        "load_s": round(load_s, 3),
        "tokenize": stats(t_tok), "encode": stats(t_enc), "tokenize_plus_encode": stats(t_all),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "cpu": cpu, "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }, indent=1))


if __name__ == "__main__":
    main()
