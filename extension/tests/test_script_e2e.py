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
    assert p.all_hr_prompts == ["a photo of pikachu <lora:spm:1>"]  # the infotext keeps the tag
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


# ---------------------------------------------------------------------------
# Whole jobs through the fake WebUI's real contracts (tests/fake_webui: settings
# drawing rule, ScriptRunner argument passing, processing order, infotext
# callables with batch-relative indices). Expected gates come from the sidecar
# itself (GateClient), expected UNet outputs from merged weights (reference()).

from modules import extra_networks, processing, scripts, ui_settings  # noqa: E402


def test_settings_page_draws_every_option():
    """The WebUI draws every option when it builds the settings UI; A1111 and Forge
    raise on a default that is not str/int/bool without a component
    (modules/ui_settings.py:22-40 / Forge :23-41)."""
    drawn = ui_settings.create_ui()
    ours = [k for k in shared.opts.data_labels if k.startswith("spm_ft_")]
    assert sorted(ours) == sorted(S.DEFAULTS)
    t = drawn["spm_ft_timeout"]
    assert type(t).__name__ == "Slider" and t.kwargs["minimum"] <= S.DEFAULTS["spm_ft_timeout"] <= t.kwargs["maximum"]
    assert type(drawn["spm_ft_port"]).__name__ == "Number" and type(drawn["spm_ft_url"]).__name__ == "Textbox"
    assert drawn["spm_ft_metric"].kwargs["choices"][0] == "clipcos_tokenuni"
    # the rule itself: the bug of issue 11 (a float default, no component) fails here
    shared.opts.add_option("spm_ft_probe", shared.OptionInfo(2.0, "probe"))
    try:
        with pytest.raises(Exception, match="bad options item type"):
            ui_settings.create_setting_component("spm_ft_probe")
    finally:
        del shared.opts.data_labels["spm_ft_probe"]
        del shared.opts.data["spm_ft_probe"]


def test_callbacks_use_the_real_signatures(webui, monkeypatch):
    d, _ = webui
    assert set(script_callbacks.callbacks) >= {"ui_settings", "cfg_denoiser", "app_started", "script_unloaded"}

    class App:  # FastAPI's app.get(path) decorator
        routes = {}

        def get(self, path, **kw):
            def deco(fn):
                self.routes[path] = fn
                return fn
            return deco

    app = App()
    monkeypatch.setattr(S, "start_sidecar", lambda: None)  # no binary configured
    script_callbacks.app_started_callback(None, app)  # --nowebui: demo is None
    assert app.routes["/spm-ft/v1/status"]()["health"]["status"] == "ok"
    with pytest.raises(TypeError):
        script_callbacks.on_ui_settings(lambda: None, "positional name")


def a1111_sampler(unet, record):
    """``sample(p, x)`` for processing.process_images: one CFG step of A1111's
    CFGDenoiser (x_in = cond rows per AND sub-prompt, then uncond rows;
    sd_samplers_cfg_denoiser.py:202-212), one inner_model call, recorded per row."""
    def sample(p, x):
        x_in, out, reps = run_a1111_batch(None, p, unet, x, lambda n, b: [(0, n)])
        record.append((p.iteration, p.is_hr_pass, x_in, out, reps))
        return x + 0.01 * out[: len(x)]
    return sample


def job_runner(unet_model, ui=(True,)):
    script = S.SpmFacilitatedTransport()
    runner = scripts.ScriptRunner([script], [list(ui)])
    lora = networks.ExtraNetworkLora()
    extra_networks.registry.clear()
    extra_networks.registry["lora"] = lora
    return runner, lora


def check_rows(record, unet, factors, want):
    """Every recorded UNet row against the merged reference at the gate of its sample."""
    for it, hires, x_in, out, reps in record:
        layout = [i for i, r in enumerate(reps) for _ in range(r)] + list(range(len(reps)))
        for r, s in enumerate(layout):
            ref = reference(unet, x_in[r:r + 1], {"spm": want[(it, hires)][s]}, factors)
            torch.testing.assert_close(out[r:r + 1], ref, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"batch {it} hires {hires} row {r} (sample {s}): {m}")


def test_n_iter_2_infotext_gates_per_image(webui):
    """Issue 11: with n_iter > 1 the infotext callable gets the index within the batch
    (processing.py:1026-1027); the gates written must be each image's own."""
    d, factors = webui
    torch.manual_seed(7)
    unet = TinyUNet()
    prompts = ["a photo of pikachu <lora:spm:1>", "a cat <lora:spm:1>", "a cat <lora:spm:0.5>", "pikachu <lora:spm:1>"]
    runner, lora = job_runner(None)
    p = StableDiffusionProcessing(prompts, 2, A1111Model(unet), scripts=runner, n_iter=2)
    record = []
    res = processing.process_images(p, a1111_sampler(unet, record))
    clean = ["a photo of pikachu ", "a cat ", "a cat ", "pikachu "]
    g = [x["spm"] for x in gates_for(clean, ["spm"], d.url).gates]
    want_img = [g[0], g[1], 0.5 * g[2], g[3]]
    assert want_img[0] != want_img[1]  # a concept prompt and an unrelated one
    texts = [info["SPM gates"] for _, info in res.infotexts]
    assert texts == [f"spm={w:.2f}" for w in want_img]
    # Processed.infotext (job index, processing.py:609-610) agrees
    assert [res.infotext(p, i)[1]["SPM gates"] for i in range(4)] == texts
    assert [prompt for prompt, _ in res.infotexts] == prompts  # the user's prompts, tags kept
    check_rows(record, unet, factors, {(0, False): want_img[:2], (1, False): want_img[2:]})
    assert lora.loaded == [[], []]  # the built-in loader never loads the SPM


def test_hires_prompt_keeps_tag_and_builtin_never_loads_spm(webui):
    """Issue 11: the hires prompt in the infotext keeps the SPM tag (so pasting it back
    keeps the membrane); the built-in loader gets neither the base nor the hires SPM."""
    d, factors = webui
    torch.manual_seed(8)
    unet = TinyUNet()
    runner, lora = job_runner(None)
    p = StableDiffusionProcessing(["a dog <lora:spm:1> <lora:style:1>", "a cat"], 2, A1111Model(unet),
                                  hr_prompts=["a photo of pikachu <lora:spm:0.8>", "a cat"], scripts=runner)
    record = []
    res = processing.process_images(p, a1111_sampler(unet, record))
    g = [x["spm"] for x in gates_for(["a dog  <lora:style:1>", "a cat", "a photo of pikachu ", "a cat"],
                                     ["spm"], d.url).gates]
    info0 = res.infotexts[0][1]
    assert info0["Hires prompt"] == "a photo of pikachu <lora:spm:0.8>"
    assert info0["SPM gates"] == f"spm={g[0]:.2f}" and info0["SPM hires gates"] == f"spm={0.8 * g[2]:.2f}"
    assert "Hires prompt" not in res.infotexts[1][1]  # same as its prompt
    assert lora.loaded == [["style"], []]  # base pass: only the plain LoRA; hires pass: nothing
    assert p.hr_prompts == ["a photo of pikachu ", "a cat"]  # the WebUI's own parse removed the tags
    check_rows(record, unet, factors, {(0, False): [g[0], 0.0], (0, True): [0.8 * g[2], 0.0]})


def test_dead_sidecar_cached_gates_are_marked(webui):
    """Issue 11: after the sidecar dies, prompts still in the client cache keep their
    gates, and the infotext says so per image; an uncached prompt fails closed."""
    d, factors = webui
    unet = TinyUNet()
    runner, _ = job_runner(None)
    p = StableDiffusionProcessing(["a photo of pikachu <lora:spm:1>", "a dog <lora:spm:1>"], 2, A1111Model(unet),
                                  scripts=runner)
    first = processing.process_images(p, a1111_sampler(unet, []))
    assert "SPM gate source" not in first.infotexts[0][1]
    d.kill()
    p = StableDiffusionProcessing(["a photo of pikachu <lora:spm:1>", "a horse <lora:spm:0.7>"], 2, A1111Model(unet),
                                  scripts=runner)
    record = []
    res = processing.process_images(p, a1111_sampler(unet, record))
    (_, a), (_, b) = res.infotexts
    assert a["SPM gates"] == first.infotexts[0][1]["SPM gates"] and a["SPM gate source"] == "cache"
    assert b["SPM gates"] == "spm=0.70" and b["SPM gate source"] == "forced 1.0"
    assert "client cache" in a["SPM note"] and "full erasure" in a["SPM note"]
    # all cached: a health check notices the dead sidecar
    p = StableDiffusionProcessing(["a dog <lora:spm:1>"], 1, A1111Model(unet), scripts=runner)
    (_, c), = processing.process_images(p, a1111_sampler(unet, [])).infotexts
    assert c["SPM gate source"] == "cache" and c["SPM gates"] == first.infotexts[1][1]["SPM gates"]
    assert c["SPM note"].startswith("sidecar unreachable, gates from the client cache")


def test_new_inner_model_at_a_reused_id_gets_hooked(webui):
    """A1111 makes a new sampler (so a new denoiser.inner_model) for every batch and
    for the hires pass; once the old one is freed its id can be reused. The pre-hook
    that maps rows must still be installed on the new object."""
    from spm_ft.runtime import Runtime

    torch.manual_seed(9)
    unet = TinyUNet()
    runner, _ = job_runner(None)
    p = StableDiffusionProcessing(["a photo of pikachu <lora:spm:1>", "a dog"], 2, A1111Model(unet), scripts=runner)
    p.scripts.process(p)
    rt = S._state["runtime"]
    assert isinstance(rt, Runtime)
    old, new = Inner(unet), Inner(unet)
    rt.install_a1111_prehook(old)
    handle = rt._pre_handles.pop(id(old))
    rt._pre_handles[id(new)] = handle  # as if `new` had been allocated where `old` was
    rt.install_a1111_prehook(new)
    assert new._forward_pre_hooks, "the new inner model was left without the row-map pre-hook"
    S.SpmFacilitatedTransport._close()
