#!/usr/bin/env python3
"""The torch anchor for the SDXL FT sidecar's per-prompt cost: tokenise + encode one new prompt
through both SDXL text encoders as diffusers' StableDiffusionXLPipeline.encode_prompt does
(CLIPTextModel ViT-L and CLIPTextModelWithProjection ViT-bigG, output_hidden_states, the
penultimate layers concatenated), batch 1, 77 tokens, fp32, CPU, on the given threads.

  HF_HUB_OFFLINE=1 oracle-venv/bin/python bench/torch_sdxl_clip_latency.py [--runs 10] [--threads 2]

Random weights (torch.manual_seed(0)) with SDXL 1.0 base's text-encoder configs; the tokenizer
is built from assets/bpe_simple_vocab_16e6.txt.gz (tokenisation is timed too). Prompts are the
same generator as bench/gate_bench.rs's, each new. Prints one JSON object (milliseconds).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,  # noqa: E402
                          CLIPTokenizer)

from make_tokenizer_fixtures import write_vocab  # noqa: E402

ADJ = ["red", "tiny", "ancient", "glowing", "wooden", "furry", "metallic", "sleepy", "giant", "paper"]
NOUN = ["fox", "castle", "robot", "teapot", "dragon", "lighthouse", "bicycle", "owl", "cactus", "ship"]


def prompt(i):
    return (f"a {ADJ[i % 10]} {NOUN[(i // 10) % 10]} next to a {ADJ[(i // 100) % 10]} "
            f"{NOUN[(i // 7) % 10]}, photo number {i}, highly detailed")


def tokenizer_dir():
    d = tempfile.mkdtemp()
    write_vocab(d)  # the real CLIP vocabulary, from assets/ (oracles.md §7.1)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.time()
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu")).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                     num_hidden_layers=32, num_attention_heads=20,
                                                     hidden_act="gelu", projection_dim=1280)).eval()
    build = time.time() - t0
    tok_d = tokenizer_dir()
    tok1 = CLIPTokenizer(os.path.join(tok_d, "vocab.json"), os.path.join(tok_d, "merges.txt"))
    tok2 = CLIPTokenizer(os.path.join(tok_d, "vocab.json"), os.path.join(tok_d, "merges.txt"), pad_token="!")

    def encode(text):
        embs = []
        with torch.inference_mode():
            for tk, te in ((tok1, te1), (tok2, te2)):
                ids = tk(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                embs.append(te(ids, output_hidden_states=True).hidden_states[-2])
            return torch.cat(embs, -1)

    for i in range(a.warmup):
        encode(prompt(10_000 + i))
    ms = []
    for i in range(a.runs):
        t = time.time()
        e = encode(prompt(i))
        ms.append((time.time() - t) * 1e3)
    assert e.shape == (1, 77, 2048)
    print(json.dumps({"impl": f"transformers {transformers.__version__} / torch {torch.__version__}",
                      "threads": a.threads, "build_s": round(build, 1), "runs": a.runs,
                      "new_prompt_ms": {"median": statistics.median(ms), "min": min(ms), "max": max(ms)}}))


if __name__ == "__main__":
    main()
