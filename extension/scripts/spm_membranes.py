"""SPM Facilitated Transport — the WebUI entry point (A1111 >= 1.9, Forge).

Only this file talks to the WebUI (``modules.*`` and the built-in Lora code,
imported lazily); the logic lives in the ``spm_ft`` package beside it.
"""

import atexit
import os
import sys
import threading

_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The package `spm_ft/` sits beside `scripts/`; the WebUI puts the extension
# root on sys.path too, but make sure it is there for `import spm_ft`.
if _EXT_ROOT not in sys.path:
    sys.path.insert(0, _EXT_ROOT)

from modules import script_callbacks, scripts, shared  # noqa: E402

from spm_ft.client import CURVES, METRICS, GateClient  # noqa: E402
from spm_ft.job import compute_job  # noqa: E402
from spm_ft.membranes import find_membrane_file, is_spm_file  # noqa: E402
from spm_ft.prompts import drop_extra_networks, parse_always_on, strip_lora_tags  # noqa: E402
from spm_ft.runtime import LOG_PREFIX, Runtime  # noqa: E402
from spm_ft.sidecar import Sidecar, serve_command  # noqa: E402

SECTION = ("spm_ft", "SPM Facilitated Transport")
DEFAULTS = {
    "spm_ft_url": "http://127.0.0.1:7862",
    "spm_ft_token": "",
    "spm_ft_always_on": "",
    "spm_ft_metric": "clipcos_tokenuni",
    "spm_ft_curve": "reference",
    "spm_ft_timeout": 2.0,
    "spm_ft_membranes_dir": "",
    "spm_ft_binary": "",
    "spm_ft_text_encoder": "",
    "spm_ft_port": 7862,
}

_state = {"runtime": None, "client": None, "client_key": None}
_sidecar = Sidecar()


def log(msg):
    print(msg, flush=True)


def opt(key):
    return getattr(shared.opts, key, DEFAULTS[key]) if hasattr(shared, "opts") else DEFAULTS[key]


def sidecar_url():
    return _sidecar.url if _sidecar.running() else (opt("spm_ft_url") or "")


def get_client():
    key = (sidecar_url(), opt("spm_ft_token"), float(opt("spm_ft_timeout")))
    if _state["client_key"] != key:
        _state["client"] = GateClient(key[0], key[1], key[2])
        _state["client_key"] = key
    return _state["client"]


def _lora_module():
    """The built-in Lora extension's ``networks`` module, if it is loaded."""
    mod = sys.modules.get("networks")
    return mod if mod is not None and hasattr(mod, "available_network_aliases") else None


def resolve_file(name):
    net = _lora_module()
    if net is not None:
        for table in ("available_network_aliases", "available_networks"):
            entry = getattr(net, table, {}).get(name)
            if entry is not None and getattr(entry, "filename", None):
                return entry.filename
    dirs = [opt("spm_ft_membranes_dir"), getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)]
    return find_membrane_file(name, [d for d in dirs if d])


def _walk(root, dotted):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _layer_resolver(sd_model):
    """kohya name → live UNet layer, through the WebUI's own key maps."""
    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        from backend.patcher.lora import model_lora_keys_unet  # Forge

        base = forge.unet.model
        key_map = model_lora_keys_unet(base, {})

        def resolve(k):
            target = key_map.get(k)
            if isinstance(target, tuple):
                target = target[0]
            if not isinstance(target, str) or not target.endswith(".weight"):
                return None
            return _walk(base, target[: -len(".weight")])

        return resolve, "forge"
    net = _lora_module()
    mapping = getattr(sd_model, "network_layer_mapping", None)
    if net is not None and mapping is not None and hasattr(net, "convert_diffusers_name_to_compvis"):
        is_sd2 = bool(getattr(sd_model, "is_sd2", False))

        def resolve(k):
            m = mapping.get(net.convert_diffusers_name_to_compvis(k, is_sd2))
            return m if m is not None else mapping.get(k)

        return resolve, "a1111"
    return None, "batch"


class SpmFacilitatedTransport(scripts.Script):
    sorting_priority = 5

    def title(self):
        return "SPM Facilitated Transport"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        with gr.Accordion("SPM Facilitated Transport", open=False):
            enabled = gr.Checkbox(
                value=True, label="Gate SPMs named in the prompt (always-on membranes from Settings apply regardless)")
        return [enabled]

    # -- job ---------------------------------------------------------------
    def process(self, p, enabled=True, *args):
        self._close()
        always = parse_always_on(opt("spm_ft_always_on"))
        hr = list(getattr(p, "all_hr_prompts", None) or [])
        prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")])
        if not enabled and not always:
            return
        job = compute_job(prompts, hr or None, always, resolve_file, is_spm_file, get_client(),
                          opt("spm_ft_metric"), opt("spm_ft_curve"), take_over_prompt_spms=bool(enabled))
        if not job.membranes:
            return
        if job.failed:
            log(f"{LOG_PREFIX} WARNING: {job.result.reason}; every gate is 1.0 (full erasure)"
                + (" except for prompts in the client cache" if "cache" in job.result.sources else ""))
        elif job.result.degraded:
            log(f"{LOG_PREFIX} WARNING: {job.result.reason}; gates from the client cache")
        rt = Runtime(job, log=log)
        rt.params = p.extra_generation_params
        p.extra_generation_params.update(job.infotext_params())
        # p.all_prompts and p.all_hr_prompts keep the user's tags: the infotext
        # ("Hires prompt" reads p.all_hr_prompts) must paste back with the SPM.
        _state["runtime"] = rt

    def before_process_batch(self, p, *args, **kwargs):
        """Take the SPM tags away from the built-in Lora loader (the extension
        applies them): the WebUI parses ``p.prompts`` into extra-network data
        right after this call and activates it at once."""
        rt = _state["runtime"]
        if rt is None or not rt.job.taken_over:
            return
        for lst in (kwargs.get("prompts"), getattr(p, "prompts", None)):
            if isinstance(lst, list):
                lst[:] = [strip_lora_tags(s, rt.job.taken_over) for s in lst]

    def process_batch(self, p, *args, **kwargs):
        """The hires prompts of the batch are parsed from ``p.all_hr_prompts``
        after ``before_process_batch`` and activated in the hires pass, after
        this call: drop the SPMs from that extra-network data instead of
        editing the prompts."""
        rt = _state["runtime"]
        if rt is None or not rt.job.taken_over:
            return
        data = getattr(p, "hr_extra_network_data", None)
        if isinstance(data, dict):
            drop_extra_networks(data, rt.job.taken_over)

    def process_before_every_sampling(self, p, *args, **kwargs):
        rt = _state["runtime"]
        if rt is None:
            return
        try:
            resolve, mode = _layer_resolver(p.sd_model)
            if resolve is not None:
                rt.install(resolve)
            hires = bool(getattr(p, "is_hr_pass", False))
            rt.begin_sampling(int(getattr(p, "iteration", 0)), int(p.batch_size), hires, mode)
            if mode == "forge":
                rt.install_forge_prehook(p.sd_model.forge_objects.unet.model.diffusion_model)
        except Exception as e:  # never crash a generation; the batch max is already set
            log(f"{LOG_PREFIX} hooking failed ({type(e).__name__}: {e}); using the batch max")
            rt.mark_per_batch("hook installation failed")

    def postprocess(self, p, processed, *args):
        self._close()

    @staticmethod
    def _close():
        rt, _state["runtime"] = _state["runtime"], None
        if rt is not None:
            rt.close()


def on_cfg_denoiser(params):
    rt = _state["runtime"]
    if rt is None or rt.mode != "a1111":
        return
    try:
        rt.a1111_cfg(params.x)
        rt.install_a1111_prehook(params.denoiser.inner_model)
    except Exception as e:
        log(f"{LOG_PREFIX} row map unavailable ({type(e).__name__}: {e}); using the batch max")
        rt.layout = None


def on_ui_settings():
    import gradio as gr

    def add(key, label, **kw):
        shared.opts.add_option(key, shared.OptionInfo(DEFAULTS[key], label, section=SECTION, **kw))

    # The settings page draws an option without a component only when its
    # default is a str, int or bool (modules/ui_settings.py, create_setting_component):
    # the float timeout needs its own component.
    add("spm_ft_url", "Sidecar URL (spm serve)")
    add("spm_ft_token", "Sidecar bearer token")
    add("spm_ft_always_on", "Always-on membranes (moderation; comma-separated, name or name:weight)")
    add("spm_ft_metric", "Gate metric", component=gr.Dropdown, component_args={"choices": list(METRICS)})
    add("spm_ft_curve", "Strength curve (reference = m², as SPM's paper)", component=gr.Dropdown,
        component_args={"choices": list(CURVES)})
    add("spm_ft_timeout", "Sidecar timeout (seconds; on timeout every gate is 1.0)", component=gr.Slider,
        component_args={"minimum": 0.1, "maximum": 30.0, "step": 0.1})
    add("spm_ft_membranes_dir", "Membrane folder (always-on membranes; --membranes of the sidecar)")
    add("spm_ft_binary", "Path to the spm binary: start the sidecar with the WebUI (empty: don't)")
    add("spm_ft_text_encoder", "Text encoder for the started sidecar (--text-encoder)")
    add("spm_ft_port", "Port of the started sidecar (0: any free port)")


def start_sidecar():
    binary = opt("spm_ft_binary")
    if not binary:
        return
    cmd = serve_command(binary, int(opt("spm_ft_port")), opt("spm_ft_membranes_dir"),
                        opt("spm_ft_text_encoder"), opt("spm_ft_token"))
    try:
        url = _sidecar.start(cmd)
        log(f"{LOG_PREFIX} sidecar started: {url}")
    except Exception as e:
        log(f"{LOG_PREFIX} WARNING: could not start the sidecar: {e}")
        return
    _sidecar.hold()  # this daemon thread lives until stop() or the WebUI's exit; so does the sidecar


def on_app_started(demo, app):
    threading.Thread(target=start_sidecar, daemon=True, name="spm-sidecar-start").start()

    @app.get("/spm-ft/v1/status")
    def _status():
        c = get_client()
        return {"sidecar": sidecar_url(), "managed": _sidecar.running(), "health": c.health()}


def on_script_unloaded():
    SpmFacilitatedTransport._close()
    _sidecar.stop()


script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_script_unloaded(on_script_unloaded)
atexit.register(_sidecar.stop)
