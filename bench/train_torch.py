"""The anchor for bench/train_bench.rs: the same training step in torch.

One step = the method's loss at a fixed latent x (no sampling trajectory)
+ backward + one optimizer step, f32, batch 1, on diffusers'
UNet2DConditionModel (tiny: fixtures/data/generate/sd1's UNet; sd15: the
config bench/sd15_config.py writes, random init). Frozen weights have
requires_grad False; the LoRA is a plain wrapper y = W x + s·up(down(x)) on
the same module sets as spm's (Method::selects); attention is diffusers'
default (SDPA) except on attn2 for fmn, whose probe needs the probabilities.

Usage: train_torch.py MODEL METHOD LATENT RUNS [THREADS]
One warm-up step, then RUNS timed steps; prints one JSON line.
"""
import copy, json, math, os, subprocess, sys, tempfile, time

import torch
import torch.nn as nn
import torch.nn.functional as F
import diffusers
from diffusers import UNet2DConditionModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = os.path.join(ROOT, "fixtures", "data", "generate", "sd1")

model = sys.argv[1] if len(sys.argv) > 1 else "tiny"
method = sys.argv[2] if len(sys.argv) > 2 else "spm"
latent = int(sys.argv[3]) if len(sys.argv) > 3 else 32
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
threads = int(sys.argv[5]) if len(sys.argv) > 5 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)


def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def selects(path):
    """spm's Method::selects."""
    if method == "spm":
        return ".attentions." in path
    return "attn2" in path


class LoRA(nn.Module):
    """y = W x + s·up(down(x)); down like the layer (same kernel, stride,
    padding), up 1x1; kaiming_uniform(a=√5) down, zero up (kohya / spm)."""
    enabled = True

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                  base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x, *a, **k):
        y = self.base(x)
        if LoRA.enabled:
            y = y + self.scale * self.up(self.down(x))
        return y


def add_lora(unet, rank, alpha):
    targets = [(n, m) for n, m in unet.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and selects(n)]
    params = []
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        w = LoRA(mod, rank, alpha)
        setattr(parent, child, w)
        params += [w.down.weight, w.up.weight]
    return len(targets), params


class Probe:
    """FMN's probe: Σ p² over the masked token columns, per attn2 layer;
    the probabilities are formed explicitly (diffusers' AttnProcessor)."""

    def __init__(self, mask):
        self.mask = mask
        self.sums = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        p = attn.get_attention_scores(q, k, None)
        m = p.shape[-1]
        sel = p.reshape(b, attn.heads, n, m) * self.mask.reshape(b, 1, 1, m)
        self.sums.append(sel.pow(2).sum())
        h = attn.batch_to_head_dim(torch.bmm(p, v))
        return attn.to_out[1](attn.to_out[0](h))


t0 = time.time()
if model == "tiny":
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet", torch_dtype=torch.float32)
else:
    cfg_dir = os.path.join(tempfile.gettempdir(), "spm_sd15_config")
    if not os.path.exists(os.path.join(cfg_dir, "unet", "config.json")):
        subprocess.run([sys.executable, os.path.join(HERE, "sd15_config.py"), cfg_dir],
                       check=True, stdout=subprocess.DEVNULL)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg_dir, subfolder="unet"))
unet = unet.to(torch.float32).eval()
unet.requires_grad_(False)
ctx_dim = unet.config.cross_attention_dim

text = None
if model == "tiny":
    from transformers import CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(TINY, subfolder="text_encoder", dtype=torch.float32).eval()

    def emb(s):
        ids = tok([s], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return enc(ids)[0]
else:
    def emb(s):
        return torch.randn(1, 77, ctx_dim)

base = unet
if method == "spm":
    n_mod, params = add_lora(unet, 1, 1.0)
    trained = unet
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
elif method == "esd-x":
    trained = copy.deepcopy(base)
    params = []
    mods = set()
    for n, p in trained.named_parameters():
        if "attn2" in n:
            p.requires_grad_(True)
            params.append(p)
            mods.add(n.rsplit(".", 1)[0])
    n_mod = len(mods)
    opt = torch.optim.Adam(params, lr=5e-5)
elif method == "fmn":
    n_mod, params = add_lora(unet, 4, 1.0)
    trained = unet
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
else:
    sys.exit(f"unknown method {method}")
build = time.time() - t0
rss_build = status_mb("VmRSS:")

g = torch.Generator().manual_seed(0)
x = torch.randn(1, 4, latent, latent, generator=g)


def ts(n, t):
    return torch.full((n,), float(t))


def eps(net, on, x, t, ctx):
    LoRA.enabled = on
    if on:
        return net(x, ts(x.shape[0], t), encoder_hidden_states=ctx).sample
    with torch.no_grad():
        return net(x, ts(x.shape[0], t), encoder_hidden_states=ctx).sample


if method == "spm":
    target, uncond = emb("snoopy"), emb("")
    positive, neutral = target, uncond
    noise = torch.randn(4, 1, 77, ctx_dim, generator=g)
    scales = [0.9, 1.0, 1.1, 1.0]
    tn = target.norm()
    anchors = torch.stack([noise[i] / noise[i].norm() * tn * s for i, s in enumerate(scales)])
    sn = anchors.shape[0]
    lst = []
    for i in range(sn):
        lst += [uncond, anchors[i]]
    batch = torch.cat(lst[sn:], 0)  # Anchors::Half: [u, a3, u, a4]
    t_q = 999 - (10 * 1000) // 30

    def loss_fn():
        e_pos = eps(base, False, x, t_q, positive)
        e_neu = eps(base, False, x, t_q, neutral)
        e_tar = eps(trained, True, x, t_q, target)
        goal = e_neu - 1.0 * (e_pos - e_neu)
        l_erase = F.mse_loss(e_tar, goal)
        xs = x.repeat(batch.shape[0] // x.shape[0], 1, 1, 1)
        a_on = eps(trained, True, xs, t_q, batch)
        a_off = eps(base, False, xs, t_q, batch)
        return l_erase + 1000.0 * F.mse_loss(a_on, a_off)
elif method == "esd-x":
    concept, null = emb("snoopy"), emb("")

    def loss_fn():
        e_erase = eps(base, False, x, 500, concept)
        e_null = eps(base, False, x, 500, null)
        e_esd = eps(trained, True, x, 500, concept)
        return F.mse_loss(e_esd, e_erase - 2.0 * (e_erase - e_null))
else:
    prompt = emb("a photo of snoopy")
    mask = torch.zeros(1, 77)
    mask[0, 1:6] = 1.0
    probe = Probe(mask)
    procs = {k: (probe if "attn2" in k else v) for k, v in unet.attn_processors.items()}
    unet.set_attn_processor(procs)

    def loss_fn():
        probe.sums = []
        eps(trained, True, x, 500, prompt)
        return torch.stack(probe.sums).sum().sqrt()

fw, bw, op, st, losses = [], [], [], [], []
for i in range(runs + 1):
    a = time.perf_counter()
    loss = loss_fn()
    lv = float(loss.detach())
    b = time.perf_counter()
    loss.backward()
    c = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del loss
    d = time.perf_counter()
    if i == 0:
        warm = round(d - a, 3)
        continue
    losses.append(lv)
    fw.append(round(b - a, 3)); bw.append(round(c - b, 3)); op.append(round(d - c, 3)); st.append(round(d - a, 3))

attn = sorted({type(p).__name__ for p in unet.attn_processors.values()})
print(json.dumps({
    "impl": f"torch {torch.__version__} / diffusers {diffusers.__version__}", "model": model,
    "method": method, "latent": latent, "threads": threads, "trainable_modules": n_mod,
    "trainable_tensors": len(params), "trainable_params": sum(p.numel() for p in params),
    "build_s": round(build, 2), "warmup_s": warm, "step_s": st, "forward_s": fw, "backward_s": bw, "optim_s": op,
    "loss": losses, "attention": attn, "rss_after_build_mb": round(rss_build),
    "peak_rss_mb": round(status_mb("VmHWM:"))}))
