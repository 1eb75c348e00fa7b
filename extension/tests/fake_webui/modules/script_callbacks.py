"""Callback registration and firing with the real signatures (our own code).

Contracts, A1111 v1.10.1 ``modules/script_callbacks.py`` (Forge dfdcbab6: same lines):
* registration ``on_X(callback, *, name=None)``: ``on_app_started`` l.456,
  ``on_model_loaded`` l.467, ``on_ui_settings`` l.493, ``on_cfg_denoiser`` l.523,
  ``on_script_unloaded`` l.581 — a second positional argument is a TypeError;
* firing: ``app_started_callback(demo, app)`` calls ``callback(demo, app)`` (l.253-256;
  ``demo`` is None with ``--nowebui``), ``ui_settings_callback()`` calls ``callback()``
  (l.298-301), ``cfg_denoiser_callback(params)`` calls ``callback(params)`` (l.330-333),
  ``script_unloaded_callback()`` calls ``callback()`` (l.386-389);
* ``CFGDenoiserParams(x, image_cond, sigma, sampling_step, total_sampling_steps,
  text_cond, text_uncond, denoiser=None)`` (l.45-46); the CFG denoiser passes
  itself as ``denoiser`` (A1111 ``modules/sd_samplers_cfg_denoiser.py:211``).
"""

callbacks = {}


def _reg(kind):
    def register(callback, *, name=None):
        callbacks.setdefault(kind, []).append(callback)
    register.__name__ = f"on_{kind}"
    return register


on_app_started = _reg("app_started")
on_model_loaded = _reg("model_loaded")
on_ui_settings = _reg("ui_settings")
on_cfg_denoiser = _reg("cfg_denoiser")
on_script_unloaded = _reg("script_unloaded")

# the argument list each kind is fired with
_ARITY = {"app_started": 2, "model_loaded": 1, "ui_settings": 0, "cfg_denoiser": 1, "script_unloaded": 0}


def fire(kind, *args):
    if len(args) != _ARITY[kind]:
        raise TypeError(f"{kind} callbacks get {_ARITY[kind]} arguments, not {len(args)}")
    for fn in callbacks.get(kind, []):
        fn(*args)


def app_started_callback(demo, app):
    fire("app_started", demo, app)


def ui_settings_callback():
    fire("ui_settings")


def cfg_denoiser_callback(params):
    fire("cfg_denoiser", params)


def script_unloaded_callback():
    fire("script_unloaded")


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser
