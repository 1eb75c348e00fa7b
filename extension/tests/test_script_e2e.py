"""scripts/spm_membranes.py end to end against a fake WebUI (tests/fake_webui) and the
real sidecar: process → before_process_batch → process_before_every_sampling →
CFG calls (A1111 row layouts / Forge cond_or_uncond) → infotext → postprocess."""

import copy
import importlib.util
import os
import sys

import pytest
import torch

from conftest import EXT, HERE, start_daemon

sys.path.insert(0, os.path.join(HERE, "fake_webui"))

import networks  # noqa: E402  (the fake built-in Lora module)
from modules import script_callbacks, shared  # noqa: E402
from modules.processing import StableDiffusionProcessing  # noqa: E402
from spm_ft.membranes import load_factors, lora_scale  # noqa: E402


def load_script():
    spec = importlib.util.spec_from_file_location("spm_ft_script_under_test", os.path.join(EXT, "scripts", "spm_membranes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = load_script()
script_callbacks.fire("ui_settings")

KEYS = ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.attentions.0.proj_out"]


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Conv2d(8, 8, 1)
        self.proj_out = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.proj_out(torch.tanh(self.proj_in(x)))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attentions = torch.nn.ModuleList([Attn()])


class TinyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down_blocks = torch.nn.ModuleList([Block()])

    def forward(self, x, timesteps=None, transformer_options=None):
        return self.down_blocks[0].attentions[0](x)


class Inner(torch.nn.Module):  # A1111's k-diffusion wrapper around the UNet
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, sigma=None, cond=None):
        return self.unet(x)


class Denoiser:
    def __init__(self, inner, p):
        self.inner_model, self.p = inner, p


class A1111Model:
    def __init__(self, unet):
        self.is_sd2 = False
        self.network_layer_mapping = {
            "diffusion_model_" + k.replace(".", "_"): unet.get_submodule(k) for k in KEYS}


class ForgeModel:
    class _O:
        pass

    def __init__(self, unet):
        self.forge_objects = self._O()
        self.forge_objects.unet = self._O()
        self.forge_objects.unet.model = self._O()
        self.forge_objects.unet.model.diffusion_model = unet


def reference(unet, x, gates_by_name, factors):
    """The UNet with each membrane merged at the given strength (one sample)."""
    m = copy.deepcopy(unet)
    for mod in m.modules():
        mod._forward_hooks.clear()
        mod._forward_pre_hooks.clear()
    with torch.no_grad():
        for name, g in gates_by_name.items():
            for k in KEYS:
                d, u, a = factors[name]["lora_unet_" + k.replace(".", "_")]
                layer = m.get_submodule(k)
                layer.weight += g * lora_scale(d, a) * (u.flatten(1) @ d.flatten(1)).reshape(layer.weight.shape)
    return m(x)


@pytest.fixture
def webui(mem_dir):
    d = start_daemon(mem_dir)
    files = {n: str(mem_dir / f"{n}.safetensors") for n in ("spm", "spm2")}
    networks.available_network_aliases.clear()
    for n, f in files.items():
        networks.available_network_aliases[n] = networks.NetworkOnDisk(n, f)
    shared.opts.spm_ft_url = d.url
    shared.opts.spm_ft_always_on = ""
    shared.opts.spm_ft_membranes_dir = str(mem_dir)
    shared.opts.spm_ft_timeout = 5.0
    S._state["client_key"] = None
    factors = {n: load_factors(f) for n, f in files.items()}
    yield d, factors
    S.SpmFacilitatedTransport._close()
    d.kill()


def gates_for(prompts, names, url):
    from spm_ft.client import GateClient
    return GateClient(url, timeout=5).gates(prompts, names)


def run_a1111_batch(script, p, unet, x, calls):
    """Emulates CFGDenoiser: x_in = [cond rows per AND sub-prompt…, uncond rows], split into calls."""
    inner = Inner(unet)
    reps = [len(s.split(" AND ")) for s in p.prompts]
    x_in = torch.cat([x[i:i + 1].repeat(r, 1, 1, 1) for i, r in enumerate(reps)] + [x])
    params = script_callbacks.CFGDenoiserParams(x_in, None, None, 0, 20, None, None, Denoiser(inner, p))
    script_callbacks.fire("cfg_denoiser", params)
    outs = [inner(x_in[a:b]) for a, b in calls(x_in.shape[0], len(reps))]
    return x_in, torch.cat(outs), reps


@pytest.mark.parametrize("calls", [
    lambda n, b: [(0, n)],  # one call
    lambda n, b: [(0, n - b), (n - b, n)],  # cond then uncond
    lambda n, b: [(a, min(a + b, n)) for a in range(0, n, b)],  # chunks of B
])
def test_a1111_mixed_batch(webui, calls):
    d, factors = webui
    torch.manual_seed(1)
    unet = TinyUNet()
    p = StableDiffusionProcessing(
        ["a photo of pikachu <lora:spm:0.8>", "a dog <lora:spm:0.8> AND a cat", "a cat <lora:other:1>"],
        3, A1111Model(unet))
    script = S.SpmFacilitatedTransport()
    script.process(p, True)
    prompts = p.start_batch(0)
    script.before_process_batch(p, True, batch_number=0, prompts=prompts, seeds=[], subseeds=[])
    assert p.prompts == ["a photo of pikachu ", "a dog  AND a cat", "a cat <lora:other:1>"]
    assert p.all_prompts[0].endswith("<lora:spm:0.8>")  # the infotext keeps the user's prompt
    x = torch.randn(3, 8, 4, 4)
    script.process_before_every_sampling(p, True, x=x, noise=None, c=None, uc=None)
    x_in, out, reps = run_a1111_batch(script, p, unet, x, calls)
    g = gates_for(["a photo of pikachu ", "a dog  AND a cat", "a cat <lora:other:1>"], ["spm"], d.url).gates
    want = [0.8 * g[0]["spm"], 0.8 * g[1]["spm"], 0.0]
    layout = [0, 1, 1, 2, 0, 1, 2]
    for r, s in enumerate(layout):
        ref = reference(unet, x_in[r:r + 1], {"spm": want[s]}, factors)
        torch.testing.assert_close(out[r:r + 1], ref, atol=1e-5, rtol=1e-5)
    info = p.extra_generation_params
    assert info["SPM gates"](p=p, index=0) == f"spm={want[0]:.2f}"
    assert info["SPM gates"](p=p, index=2) == "spm=0.00"
    assert info["SPM metric"] == "clipcos_tokenuni, curve reference"
    assert "SPM note" not in info
    script.postprocess(p, None)
    torch.testing.assert_close(Inner(unet)(x_in), reference(unet, x_in, {}, factors))


def test_forge_cond_or_uncond_and_always_on(webui):
    d, factors = webui
    shared.opts.spm_ft_always_on = "spm2"
    torch.manual_seed(2)
    unet = TinyUNet()
    p = StableDiffusionProcessing(["a cat", "a photo of pikachu <lora:spm:1>"], 2, ForgeModel(unet))
    script = S.SpmFacilitatedTransport()
    script.process(p, True)
    prompts = p.start_batch(0)
    script.before_process_batch(p, True, batch_number=0, prompts=prompts, seeds=[], subseeds=[])
    x = torch.randn(2, 8, 4, 4)
    script.process_before_every_sampling(p, True, x=x, noise=None, c=None, uc=None)
    script.process_before_every_sampling(p, True, x=x, noise=None, c=None, uc=None)  # idempotent
    g = gates_for(["a cat", "a photo of pikachu "], ["spm", "spm2"], d.url).gates
    xx = torch.cat([x, x])
    out = unet(xx, None, transformer_options={"cond_or_uncond": [0, 1]})
    for r in range(4):
        s = r % 2
        want = {"spm2": g[s]["spm2"], "spm": g[s]["spm"] if s == 1 else 0.0}
        torch.testing.assert_close(out[r:r + 1], reference(unet, xx[r:r + 1], want, factors), atol=1e-5, rtol=1e-5)
    assert p.extra_generation_params["SPM gates"](p=p, index=0) == f"spm={0.0:.2f}, spm2={g[0]['spm2']:.2f}"
    script.postprocess(p, None)


def test_fail_closed_when_sidecar_killed(webui, capsys):
    d, factors = webui
    d.kill()
    torch.manual_seed(3)
    unet = TinyUNet()
    p = StableDiffusionProcessing(["a dog <lora:spm:0.6>", "a cow"], 2, A1111Model(unet))
    script = S.SpmFacilitatedTransport()
    script.process(p, True)
    script.before_process_batch(p, True, batch_number=0, prompts=p.start_batch(0), seeds=[], subseeds=[])
    x = torch.randn(2, 8, 4, 4)
    script.process_before_every_sampling(p, True, x=x, noise=None, c=None, uc=None)
    x_in, out, _ = run_a1111_batch(script, p, unet, x, lambda n, b: [(0, n)])
    for r, s in enumerate([0, 1, 0, 1]):
        want = {"spm": 0.6 if s == 0 else 0.0}  # ceiling × 1.0
        torch.testing.assert_close(out[r:r + 1], reference(unet, x_in[r:r + 1], want, factors), atol=1e-5, rtol=1e-5)
    assert "full erasure" in p.extra_generation_params["SPM note"]
    assert p.extra_generation_params["SPM gates"](p=p, index=0) == "spm=0.60"
    assert "WARNING" in capsys.readouterr().out
    script.postprocess(p, None)


def test_unknown_fork_uses_batch_max(webui, capsys):
    d, factors = webui
    shared.opts.spm_ft_always_on = "spm"
    class Unknown:
        pass

    p = StableDiffusionProcessing(["a photo of pikachu", "a dog"], 2, Unknown())
    script = S.SpmFacilitatedTransport()
    script.process(p, False)  # the UI switch cannot turn always-on membranes off
    x = torch.randn(2, 8, 4, 4)
    script.process_before_every_sampling(p, False, x=x, noise=None, c=None, uc=None)
    g = gates_for(["a photo of pikachu", "a dog"], ["spm"], d.url).gates
    assert "per-batch" in capsys.readouterr().out
    assert "per-batch" in p.extra_generation_params["SPM note"]
    # no layer could be resolved without a WebUI key map: nothing hooked, but the gates are recorded
    assert p.extra_generation_params["SPM gates"](p=p, index=1) == f"spm={g[1]['spm']:.2f}"
    script.postprocess(p, None)


def test_disabled_leaves_prompt_spms_to_builtin_lora(webui):
    p = StableDiffusionProcessing(["a cat <lora:spm:1>"], 1, A1111Model(TinyUNet()))
    script = S.SpmFacilitatedTransport()
    script.process(p, False)
    script.before_process_batch(p, False, batch_number=0, prompts=p.start_batch(0), seeds=[], subseeds=[])
    assert p.prompts == ["a cat <lora:spm:1>"] and p.extra_generation_params == {}


def test_hires_pass_uses_hires_prompt_gates(webui):
    d, factors = webui
    torch.manual_seed(5)
    unet = TinyUNet()
    p = StableDiffusionProcessing(["a dog <lora:spm:1>"], 1, ForgeModel(unet),
                                  hr_prompts=["a photo of pikachu <lora:spm:1>"])
    script = S.SpmFacilitatedTransport()
    script.process(p, True)
    assert p.all_hr_prompts == ["a photo of pikachu "]
    script.before_process_batch(p, True, batch_number=0, prompts=p.start_batch(0), seeds=[], subseeds=[])
    g = gates_for(["a dog ", "a photo of pikachu "], ["spm"], d.url).gates
    for hires, want in ((False, g[0]["spm"]), (True, g[1]["spm"])):
        p.is_hr_pass = hires
        x = torch.randn(1, 8, 4, 4)
        script.process_before_every_sampling(p, True, x=x, noise=None, c=None, uc=None)
        xx = torch.cat([x, x])
        out = unet(xx, None, transformer_options={"cond_or_uncond": [0, 1]})
        torch.testing.assert_close(out, reference(unet, xx, {"spm": want}, factors), atol=1e-5, rtol=1e-5)
    assert p.extra_generation_params["SPM hires gates"](p=p, index=0) == f"spm={g[1]['spm']:.2f}"
    script.postprocess(p, None)


def test_no_cfg_callback_falls_back_to_batch_max(webui, capsys):
    """A fork with A1111 key maps but no on_cfg_denoiser: every row gets the batch max."""
    d, factors = webui
    torch.manual_seed(6)
    unet = TinyUNet()
    p = StableDiffusionProcessing(["a photo of pikachu <lora:spm:1>", "a dog <lora:spm:0.5>"], 2, A1111Model(unet))
    script = S.SpmFacilitatedTransport()
    script.process(p, True)
    script.before_process_batch(p, True, batch_number=0, prompts=p.start_batch(0), seeds=[], subseeds=[])
    x = torch.randn(2, 8, 4, 4)
    script.process_before_every_sampling(p, True, x=x, noise=None, c=None, uc=None)
    xx = torch.cat([x, x])
    out = Inner(unet)(xx)
    g = gates_for(["a photo of pikachu ", "a dog "], ["spm"], d.url).gates
    top = max(g[0]["spm"], 0.5 * g[1]["spm"])
    torch.testing.assert_close(out, reference(unet, xx, {"spm": top}, factors), atol=1e-5, rtol=1e-5)
    assert "per-batch" in capsys.readouterr().out
    assert "per-batch" in p.extra_generation_params["SPM note"]
    # the infotext still records each image's own gate
    assert p.extra_generation_params["SPM gates"](p=p, index=1) == f"spm={0.5 * g[1]['spm']:.2f}"
    script.postprocess(p, None)
